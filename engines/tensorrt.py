"""TensorRT runtime (TensorRT 10 Python API + pycuda), behind the `lineguard[gpu]` extra.

Build: the model's ONNX graph is parsed, an optimisation profile covers batch 1..max_batch
(optimum at max_batch), fp16 / int8 flags are set (int8 with an entropy calibrator over the
model's normal training images, its cache written next to the plan and reused), and the
serialised plan is cached per GPU model and precision. Run: the plan is deserialised at
activation; page-locked host buffers, device buffers and one CUDA stream per engine; input
copy, execution and output copy are asynchronous on that stream.

Nothing here is imported by `import engines` or `import pipeline`; tensorrt and pycuda are
imported on activation or build only. Not yet run on a GPU (see README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from engines.compiled import write_record
from engines.errors import ConfigError, MissingExtraError
from engines.runtimes import Engine


def _import():
    try:
        import pycuda.autoinit  # noqa: F401  creates the CUDA context of this process
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise MissingExtraError(f"{exc.name} is not installed; pip install 'lineguard[gpu]' on a machine with an "
                                "NVIDIA GPU and CUDA") from None
    return trt, cuda


def build_plan(onnx_path: Path, plan: Path, height: int, width: int, precision: str = "fp16", max_batch: int = 32,
               calibration: Iterable[np.ndarray] | None = None, workspace_gb: float = 2.0) -> Path:
    """Build and serialise a TensorRT plan for images uint8 [1..max_batch, H, W, 3]; its record beside it."""
    trt, cuda = _import()
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"tensorrt precision {precision!r}; valid: fp32, fp16, int8")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, height, width, 3), (max_batch, height, width, 3), (max_batch, height, width, 3))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibration is None:
            raise ConfigError("int8 needs calibration images (the model's normal training images)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _entropy_calibrator(trt, cuda, calibration, plan.with_suffix(".calib"))
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError(f"TensorRT failed to build {onnx_path} at {precision}; see the TensorRT log above")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(bytes(serialized))
    write_record(plan, {"runtime": "tensorrt", "precision": precision, "max_batch": max_batch,
                        "tensorrt": trt.__version__, "gpu": plan.stem.split("-", 1)[1].rsplit("-", 1)[0]})
    return plan


def _entropy_calibrator(trt, cuda, batches: Iterable[np.ndarray], cache: Path):
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = iter(batches)
            self.device = None
            self.size = 1

        def get_batch_size(self):
            return self.size

        def get_batch(self, names):
            batch = next(self.batches, None)
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, np.uint8)
            if self.device is None:
                self.device = cuda.mem_alloc(batch.nbytes)
                self.size = len(batch)
            cuda.memcpy_htod(self.device, batch)
            return [int(self.device)]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calibrator()


class TensorRTEngine(Engine):
    """Runs a serialised plan: uint8 [N, H, W, 3] -> float32 [N, ...] (embeddings or maps), any N."""

    name = "tensorrt"

    def __init__(self, plan: Path, height: int, width: int, max_batch: int = 32):
        super().__init__(height, width)
        self.plan = Path(plan)
        self.max_batch = max_batch

    def _activate_impl(self) -> None:
        trt, cuda = _import()
        self._cuda = cuda
        if not self.plan.is_file():
            raise ConfigError(f"TensorRT plan {self.plan} not found; build it with lineguard export --runtime tensorrt")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise ConfigError(f"{self.plan} does not deserialise on this GPU / TensorRT version; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.input_name = self.engine.get_tensor_name(0)
        self.output_name = self.engine.get_tensor_name(1)
        shape = (self.max_batch, self.height, self.width, 3)
        self.context.set_input_shape(self.input_name, shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))  # [B, ...]
        self.host_in = cuda.pagelocked_empty(shape, np.uint8)
        self.host_out = cuda.pagelocked_empty(out_shape, np.float32)
        self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
        self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self.dev_in))
        self.context.set_tensor_address(self.output_name, int(self.dev_out))

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            n = len(chunk)
            self.host_in[:n] = chunk
            self.context.set_input_shape(self.input_name, (n,) + chunk.shape[1:])
            self._cuda.memcpy_htod_async(self.dev_in, self.host_in[:n], self.stream)
            self.context.execute_async_v3(self.stream.handle)
            self._cuda.memcpy_dtoh_async(self.host_out[:n], self.dev_out, self.stream)
            self.stream.synchronize()
            out.append(self.host_out[:n].copy())
        return np.concatenate(out)

    def _deactivate_impl(self) -> None:
        for attr in ("dev_in", "dev_out"):
            buf = getattr(self, attr, None)
            if buf is not None:
                buf.free()
        self.context = self.engine = self.runtime = None
