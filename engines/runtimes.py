"""One Engine contract, several runtimes.

Like Polygraphy's runners: public `activate / infer / deactivate` wrap `*_impl` methods,
the base class checks every input, and nothing heavy is touched before activation.
An engine maps uint8 images [N, S, S, 3] (NHWC, RGB) to a float32 array whose first axis is N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from engines.errors import ConfigError, InputError, MissingExtraError

RUNTIMES = ("onnxruntime", "torch", "tensorrt")
PRECISIONS = {"onnxruntime": ("fp32", "int8"), "torch": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16", "int8")}


class Engine:
    """Base of every runtime. Use as a context manager or call activate() / deactivate()."""

    name = "base"

    def __init__(self, input_size: int):
        self.input_size = input_size
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

    def infer(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, ...]; returns a new array owned by the caller."""
        if not self.active:
            raise RuntimeError(f"{self.name} engine used before activate()")
        s = self.input_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise InputError(f"engine input must be a uint8 numpy array of shape [N, {s}, {s}, 3], got {got}")
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.shape[0] < 1:
            raise InputError(f"engine input must have shape [N, {s}, {s}, 3], got {list(images.shape)}; "
                             f"resize images to {s}x{s} RGB first")
        return self._infer_impl(np.ascontiguousarray(images))

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

    def __init__(self, factory: Callable[[], "object"], input_size: int, threads: int | None = None,
                 device: str = "cpu", precision: str = "fp32", cuda_graphs: bool = False):
        super().__init__(input_size)
        if precision not in PRECISIONS["torch"]:
            raise ConfigError(f"torch runtime precision {precision!r}; valid: {', '.join(PRECISIONS['torch'])}")
        if device == "cpu" and (precision != "fp32" or cuda_graphs):
            raise ConfigError("fp16 and CUDA graphs need --device cuda; on the CPU use fp32 (or onnxruntime int8)")
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
        """Like infer, but returns a float32 torch tensor left on the engine's device (for a GPU bank)."""
        import torch

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

    def __init__(self, onnx_path: str | Path, input_size: int, threads: int | None = None):
        super().__init__(input_size)
        self.onnx_path = Path(onnx_path)
        self.threads = threads
        self.session = None

    def _activate_impl(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
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


def check_runtime(name: str, precision: str = "fp32") -> str:
    """Validate a runtime name and precision, and that the runtime is installed (one line naming the extra)."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS[name]:
        raise ConfigError(f"runtime {name} has no precision {precision!r}; valid: {', '.join(PRECISIONS[name])}")
    if name == "tensorrt":
        import importlib.util

        missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingExtraError(f"the tensorrt runtime needs {' and '.join(missing)}, which are not installed; "
                                    "pip install 'lineguard[gpu]' on a machine with an NVIDIA GPU and CUDA")
    return name
