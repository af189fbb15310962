"""One Engine contract, several runtimes, and the registry that picks one.

Like Polygraphy's runners: public `activate / infer / deactivate` wrap `*_impl` methods, the
base class checks every input, and nothing heavy is touched before activation. An engine maps
uint8 images [N, H, W, 3] (NHWC, RGB) to a float32 array whose first axis is N: patch embeddings
or anomaly maps, whatever the model's network computes.

A `Deployment` says how a model runs (runtime, precision, device, threads, CUDA graphs); it is
validated where it is made and crosses process boundaries as its JSON. Each runtime is one
`RUNTIMES` entry: its precisions, devices, engine file and how its engine is built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from engines.errors import ConfigError, InputError, MissingExtraError

if TYPE_CHECKING:
    from torch import nn


def usable_cores(root: Path = Path("/")) -> int:
    """The CPUs this process can keep busy: its affinity mask (taskset, a cpuset), bounded by the CPU
    quota of its cgroups and their parents (a container's --cpus; cgroup v1 or v2), rounded down, at
    least 1. os.cpu_count() counts the host's cores: a container given 2 of 64 would start 64 threads
    in every pool, each throttled to a thirty-second of a core. root: where /proc and /sys are."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    return max(1, min(cores, int(quota)) if quota else cores)


def _cgroup_quota(root: Path) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroups and their parents; None without one."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    base, quotas = root / "sys/fs/cgroup", []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 hierarchy: cpu.max "QUOTA PERIOD" or "max PERIOD"
            mounts = [base]
        elif "cpu" in controllers.split(","):  # v1: cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us
            mounts = [base / controllers, base / "cpu", base / "cpu,cpuacct"]
        else:
            continue
        for mount in mounts:
            here = mount / path.strip("/")
            while True:  # the process's cgroup, then each parent up to the mount (a namespace may hide the path)
                try:
                    if controllers == "":
                        quota, period = (here / "cpu.max").read_text().split()
                    else:
                        quota, period = ((here / f"cpu.cfs_{n}_us").read_text() for n in ("quota", "period"))
                    if quota != "max" and int(quota) > 0:
                        quotas.append(int(quota) / int(period))
                except (OSError, ValueError):
                    pass
                if here == mount:
                    break
                here = here.parent
    return min(quotas) if quotas else None


class Engine:
    """Base of every runtime. Use as a context manager or call activate() / deactivate()."""

    name = "base"

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.active = False

    def activate(self) -> "Engine":
        if not self.active:
            self._activate_impl()
            self.active = True
        return self

    def deactivate(self) -> None:
        if self.active:
            self._deactivate_impl()
            self.active = False

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def check(self, images: np.ndarray) -> np.ndarray:
        if not self.active:
            raise RuntimeError(f"{self.name} engine used before activate()")
        h, w = self.height, self.width
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise InputError(f"engine input must be a uint8 numpy array of shape [N, {h}, {w}, 3], got {got}")
        if images.ndim != 4 or images.shape[1:] != (h, w, 3) or images.shape[0] < 1:
            raise InputError(f"engine input must have shape [N, {h}, {w}, 3], got {list(images.shape)}; "
                             f"resize images to {w}x{h} RGB first")
        return np.ascontiguousarray(images)

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, ...]; returns a new array owned by the caller."""
        return self._infer_impl(self.check(images))

    def infer_device(self, images: np.ndarray):
        """Like infer, but the output stays on the engine's device as a float32 torch tensor (GPU paths).
        Runtimes without a device of their own return a CPU tensor."""
        import torch

        return torch.from_numpy(self.infer(images))

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass


class TorchEngine(Engine):
    """Runs a torch module built by `factory` (called on activation).

    device "cpu" or "cuda[:N]"; on CUDA: precision fp16 (half weights and activations),
    channels-last memory, and optionally one CUDA graph captured per batch size (the batch is
    copied into the graph's static input, the graph replayed). Output is always float32.
    """

    name = "torch"

    def __init__(self, factory: Callable[[], "nn.Module"], height: int, width: int, threads: int | None = None,
                 device: str = "cpu", precision: str = "fp32", cuda_graphs: bool = False):
        super().__init__(height, width)
        self.factory = factory
        self.threads = threads
        self.device = device
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self.module = None
        self._graphs: dict[int, tuple] = {}

    def _activate_impl(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        module = self.factory().eval().to(self.device)
        if self.device != "cpu":
            module = module.to(memory_format=torch.channels_last)
        if self.precision == "fp16":
            module = module.half()
        self.module = module

    def infer_device(self, images: np.ndarray):
        """uint8 [N, H, W, 3] -> float32 tensor on the engine's device; uint8 frames are pinned and copied once."""
        import torch

        images = self.check(images)
        with torch.inference_mode():
            x = torch.from_numpy(images)
            if self.device == "cpu":
                return self.module(x).float()
            x = x.pin_memory().to(self.device, non_blocking=True)
            if not self.cuda_graphs:
                return self.module(x).float()
            return self._replay(x).clone()

    def _replay(self, x):
        import torch

        n = x.shape[0]
        if n not in self._graphs:
            static_in = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up runs before capture, as torch.cuda.graphs asks
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in).float()
            self._graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[n]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        return self.infer_device(images).cpu().numpy()

    def _deactivate_impl(self) -> None:
        self.module = None
        self._graphs.clear()


class OnnxRuntimeEngine(Engine):
    """Runs an ONNX file with ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, height: int, width: int, threads: int | None = None):
        super().__init__(height, width)
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.session = None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ONNX Runtime's notes on graph rewrites are not the user's
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        # idle ORT threads otherwise spin for a while after each run, taking the cores from the
        # bank search that follows (docs/ARCHITECTURE.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]

    def _deactivate_impl(self) -> None:
        self.session = None


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Runtime:
    """One runtime: its precisions and devices ("cpu", "cuda"), the extras it needs installed, and
    `build(deployment, model_dir, height, width, network) -> Engine` (network: a factory of the
    model's torch module, for runtimes that run torch)."""

    name: str
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    build: Callable[..., Engine]
    extras: tuple[str, ...] = ()
    compiled: tuple[str, ...] = ()  # precisions whose engine `lineguard export` must build first

    def check(self, precision: str, device: str) -> None:
        if precision not in self.precisions:
            raise ConfigError(f"runtime {self.name} has no precision {precision!r}; valid: {', '.join(self.precisions)}")
        base = device.split(":")[0]
        if base not in self.devices:
            hint = {"onnxruntime": "on a GPU use --runtime torch or tensorrt",
                    "tensorrt": "use --device cuda"}.get(self.name, "")
            raise ConfigError(f"runtime {self.name} runs on {' or '.join(self.devices)}, not {device!r}"
                              + (f"; {hint}" if hint else ""))
        missing = [m for m in self.extras if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtraError(f"the {self.name} runtime needs {' and '.join(missing)}, which are not installed; "
                                    "pip install 'lineguard[gpu]' on a machine with an NVIDIA GPU and CUDA")


def _build_onnxruntime(d: "Deployment", model_dir: Path, height: int, width: int, network) -> Engine:
    from engines.compiled import engine_file

    path = engine_file(model_dir, d) if d.precision == "int8" else Path(model_dir) / "model.onnx"
    return OnnxRuntimeEngine(path, height, width, d.cpu_threads)


def _build_torch(d: "Deployment", model_dir: Path, height: int, width: int, network) -> Engine:
    return TorchEngine(network, height, width, d.cpu_threads, d.device, d.precision, d.cuda_graphs)


def _build_tensorrt(d: "Deployment", model_dir: Path, height: int, width: int, network) -> Engine:
    from engines.compiled import engine_file, read_record
    from engines.tensorrt import TensorRTEngine

    plan = engine_file(model_dir, d)
    return TensorRTEngine(plan, height, width, read_record(plan)["max_batch"])  # the plan's profile bounds its batch


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("onnxruntime", ("fp32", "int8"), ("cpu",), _build_onnxruntime, compiled=("int8",)),
    Runtime("torch", ("fp32", "fp16"), ("cpu", "cuda"), _build_torch),
    Runtime("tensorrt", ("fp32", "fp16", "int8"), ("cuda",), _build_tensorrt, extras=("tensorrt", "pycuda"),
            compiled=("fp32", "fp16", "int8")),
)}
PRECISIONS = ("fp32", "fp16", "int8")


def runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How a model runs: runtime, precision (as the runtime allows), device (cpu | cuda | cuda:N),
    CPU threads (None: every core this process may use, `usable_cores`), CUDA graphs (torch on
    CUDA). fp16 on a GPU also halves the memory bank's distance products."""

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    cuda_graphs: bool = False

    def __post_init__(self):
        if self.device != "cpu" and not (self.device == "cuda" or (self.device.startswith("cuda:")
                                                                    and self.device[5:].isdigit())):
            raise ConfigError(f"unknown device {self.device!r}; valid: cpu, cuda, cuda:N")
        runtime(self.runtime).check(self.precision, self.device)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be at least 1")
        if self.cuda_graphs and (self.runtime != "torch" or self.device == "cpu"):
            raise ConfigError("CUDA graphs need --runtime torch --device cuda")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("fp16 needs a GPU (--device cuda); on the CPU use fp32, or onnxruntime int8")
        if self.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} asked for, but no CUDA GPU is visible to torch; "
                                  "use --device cpu")

    @property
    def cpu_threads(self) -> int:
        """The threads of each CPU pool (the network's, the bank search's): `threads`, or every usable core."""
        return self.threads or usable_cores()

    def build(self, model_dir: Path, height: int, width: int, network: Callable[[], "nn.Module"]) -> Engine:
        """The engine of a model directory for this deployment (compiled engines are checked first)."""
        return RUNTIMES[self.runtime].build(self, Path(model_dir), height, width, network)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Deployment":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deployment {text!r} is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"deployment {text!r} is not a JSON object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"deployment has unknown field(s) {unknown}")
        return cls(**data)
