"""torch -> ONNX export of a network whose input is a uint8 NHWC image batch."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

OPSET = 17


def export_onnx(model: nn.Module, height: int, width: int, path: str | Path, output_name: str) -> Path:
    """Write `model` as ONNX with input ``images`` uint8 [batch, height, width, 3] (dynamic batch)."""
    path = Path(path)
    dummy = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python ints from static shapes
        torch.onnx.export(
            model.eval(), (dummy,), str(path), input_names=["images"], output_names=[output_name],
            dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    fold_pads_into_convs(path)
    return path


def fold_pads_into_convs(path: str | Path) -> int:
    """Rewrite `path` so every zero Pad feeding only a Conv becomes that Conv's own (asymmetric) pads.

    TF 'SAME' padding exports as Pad + Conv; ONNX Runtime then runs the Pad in plain NCHW and
    reorders to and from its blocked layout around it, which cost half the network's time. The
    graph is first constant-folded by ONNX Runtime's basic (portable) level so the pads are
    initializers. Returns the number of Pads folded.
    """
    import onnxruntime as ort

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for pad in graph.node:
        users = consumers.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if pad.op_type != "Pad" or mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        if pad.input[1] not in inits or (len(pad.input) > 2 and pad.input[2] and (
                pad.input[2] not in inits or np.any(numpy_helper.to_array(inits[pad.input[2]]) != 0))):
            continue
        pads = numpy_helper.to_array(inits[pad.input[1]]).astype(int)  # [n, c, h, w begin, n, c, h, w end]
        if pads.shape != (8,) or np.any(pads[[0, 1, 4, 5]] != 0):
            continue
        conv = users[0]
        own = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [own[0] + pads[2], own[1] + pads[3], own[2] + pads[6], own[3] + pads[7]]
        for a in list(conv.attribute):
            if a.name in ("pads", "auto_pad"):
                conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("pads", [int(v) for v in new]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(folded)
