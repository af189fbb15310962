"""Model kinds: one registry entry each, and the Detector contract they all serve.

A Detector maps uint8 inputs [N, H, W, 3] (the model's InputSpec) to float32 anomaly maps
[N, H/stride, W/stride], larger meaning more anomalous. Everything downstream (geometry, image
scores, thresholds, verdicts, streaming, eval, export) works on those maps and never asks which
kind made them. A kind is a module with a `KIND` attribute, listed in `_MODULES`:

    memory_bank      PatchCore-style bank of normal patch embeddings (FAISS), also few-shot
    reconstruction   encoder features reconstructed from a bottleneck: one graph, no bank
    ensemble         several fitted models of the same input, normalised maps fused
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from engines.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from engines.runtimes import Deployment, Engine

_MODULES = {"memory_bank": "calibration.memory_bank", "reconstruction": "calibration.reconstruction",
            "ensemble": "calibration.ensemble"}


class Detector:
    """uint8 inputs [N, H, W, 3] -> float32 anomaly maps [N, h, w]. Use as a context manager."""

    def __init__(self, engine: "Engine | None"):
        self.engine = engine

    def __enter__(self) -> "Detector":
        if self.engine is not None:
            self.engine.activate()
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.deactivate()

    def maps(self, inputs: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, h, w], a new array."""
        return self.maps_device(inputs).cpu().numpy()

    def maps_device(self, inputs: np.ndarray) -> "torch.Tensor":
        """Like maps, as a float32 tensor left on the detector's device (the whole GPU path stays there)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Kind:
    """name; files(manifest): the artifact files it writes (hashed in the manifest); options: its fit options
    (a frozen dataclass); fit(context) -> FitOutput; network(model_dir, manifest) -> the served torch
    module (for the torch runtime and GPU paths; None where the kind has no network of its own);
    detector(model_dir, manifest, deployment) -> Detector; stride(options): canvas pixels per map
    cell of the network those options build; parts(model_dir, manifest): the model
    directories whose `model.onnx` the compiled engines are built from (the model itself, or an
    ensemble's members)."""

    name: str
    files: Callable[[dict], list[str]]
    options: type
    fit: Callable[..., Any]
    network: Callable[[Path, dict], "torch.nn.Module"] | None
    detector: Callable[[Path, dict, "Deployment"], Detector]
    stride: Callable[[Any], int]
    parts: Callable[[Path, dict], list[Path]] = lambda model_dir, manifest: [Path(model_dir)]


def kind_names() -> list[str]:
    return list(_MODULES)


def get_kind(name: str) -> Kind:
    if name not in _MODULES:
        raise ConfigError(f"unknown model kind {name!r}; valid kinds: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).KIND
