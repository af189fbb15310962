"""One Engine contract, several runtimes.

Like Polygraphy's runners: public `activate / infer / deactivate` wrap `*_impl` methods,
the base class checks every input, and nothing heavy is touched before activation.
An engine maps uint8 images [N, S, S, 3] (NHWC, RGB) to a float32 array whose first axis is N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from engines.errors import ConfigError, InputError

RUNTIMES = ("onnxruntime", "torch")


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
    """Runs a torch module built by `factory` (called on activation) on the CPU."""

    name = "torch"

    def __init__(self, factory: Callable[[], "object"], input_size: int, threads: int | None = None):
        super().__init__(input_size)
        self.factory = factory
        self.threads = threads
        self.module = None

    def _activate_impl(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.module = self.factory().eval()

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(images)).numpy()

    def _deactivate_impl(self) -> None:
        self.module = None


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
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _infer_impl(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]

    def _deactivate_impl(self) -> None:
        self.session = None


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")
    return name
