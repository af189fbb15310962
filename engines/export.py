"""torch -> ONNX export of a network whose input is a uint8 NHWC image batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def export_onnx(model: nn.Module, input_size: int, path: str | Path, output_name: str = "embeddings") -> Path:
    """Write `model` as ONNX with input ``images`` uint8 [batch, S, S, 3] (dynamic batch)."""
    path = Path(path)
    dummy = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints from static shapes
        torch.onnx.export(
            model.eval(), (dummy,), str(path), input_names=["images"], output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    return path
