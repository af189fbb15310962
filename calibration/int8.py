"""INT8 calibration from the model's own normal training images.

ONNX Runtime: static quantisation of model.onnx (QOperator format, int8 weights, uint8
activations) with a calibration reader that feeds N training images, written to
``<model>/engines/onnxruntime-int8.onnx`` with its settings in ``onnxruntime-int8.json``.
TensorRT INT8 uses the same images through `calibration_batches` (engines/tensorrt.py).

The preprocessing at the head of the graph (Cast, Sub, Mul) and the final projection stay in
float: quantising them cost more in (de)quantisation than it saved. Which ops, which method
and per-channel weights were chosen by measurement (bench/results/int8-*.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.artifact import ArtifactError, load_manifest, sha256
from calibration.dataset import iter_batches, train_images
from engines.errors import ConfigError, MissingExtraError

METHODS = ("minmax", "entropy", "percentile")
QUANTISED_OPS = ("Conv", "Clip", "Add", "AveragePool", "Concat", "Resize", "Transpose")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """method: activation range calibration; per_channel: per-output-channel weight scales;
    images: how many normal training images calibrate (evenly spread over the sorted list)."""

    method: str = "minmax"
    per_channel: bool = True
    images: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.images < 1:
            raise ConfigError(f"calibration images {self.images} must be at least 1")


def engine_path(model_dir: Path, runtime: str, precision: str) -> Path:
    return Path(model_dir) / "engines" / f"{runtime}-{precision}.onnx"


def calibration_images(model_dir: Path, count: int, data: str | Path | None = None) -> list[Path]:
    """`count` training images of the model, evenly spread over the sorted list (deterministic)."""
    manifest = load_manifest(model_dir)
    source = data or manifest["fit"].get("data")
    if not source:
        raise ArtifactError(f"{model_dir}: the manifest does not say which images it was fitted on; "
                            "pass --data DIR with the normal training images")
    paths = train_images(source)
    picks = np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int)
    return [paths[i] for i in np.unique(picks)]


def calibration_batches(paths: list[Path], size: int, batch: int = 1) -> Iterator[np.ndarray]:
    """uint8 [B, S, S, 3] batches of the calibration images, as the engine sees them."""
    for images, _ in iter_batches(paths, size, batch):
        yield images


def quantize_onnxruntime(model_dir: str | Path, config: Int8Config = Int8Config(), data: str | Path | None = None) -> dict:
    """Write engines/onnxruntime-int8.onnx (+ .json); returns the settings record."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingExtraError("onnxruntime quantization tools are missing; pip install onnxruntime") from None

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    size = manifest["embedding"]["input_size"]
    paths = calibration_images(model_dir, config.images, data)
    batches = list(calibration_batches(paths, size))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"images": batch}

    out = engine_path(model_dir, "onnxruntime", "int8")
    out.parent.mkdir(exist_ok=True)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    start = time.perf_counter()
    chatter = io.StringIO()  # the quantisation tools print model fragments and progress
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(chatter), _quiet_logging():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / "model.onnx"), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QOperator,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=list(QUANTISED_OPS))
    uint8_input = feed_uint8_input(out)
    record = {"runtime": "onnxruntime", "precision": "int8", **dataclasses.asdict(config), "uint8_input": uint8_input,
              "quantised_ops": list(QUANTISED_OPS), "format": "QOperator", "weights": "int8", "activations": "uint8",
              "calibration_images": [str(p) for p in paths], "source_sha256": manifest["files"]["model.onnx"],
              "sha256": sha256(out), "seconds": round(time.perf_counter() - start, 2)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def feed_uint8_input(path: Path) -> bool:
    """Let the first QLinearConv read the uint8 image itself when the normalisation is one integer
    mean and one scale for all channels (EfficientNet-Lite: (x - 127) / 128).

    (x - mean) * inv_std is exactly a dequantisation of x with zero point `mean` and scale
    `inv_std`, so Cast -> Sub -> Mul -> QuantizeLinear (two float passes over the image and a
    rounding) becomes nothing. Returns whether the graph was rewritten.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quant = next((n for n in graph.node if n.op_type == "QuantizeLinear"), None)
    chain = []
    node = quant
    for op in ("Mul", "Sub", "Cast"):
        node = by_output.get(node.input[0]) if node is not None else None
        if node is None or node.op_type != op:
            return False
        chain.append(node)
    mul, sub, cast = chain
    if mul.input[1] not in inits or sub.input[1] not in inits:
        return False
    inv_std = numpy_helper.to_array(inits[mul.input[1]]).ravel()
    mean = numpy_helper.to_array(inits[sub.input[1]]).ravel()
    if np.ptp(inv_std) or np.ptp(mean) or mean[0] != round(mean[0]) or not 0 <= mean[0] <= 255:
        return False
    users = consumers.get(quant.output[0], [])
    if not users or any(u.op_type != "QLinearConv" for u in users):
        return False
    scale = numpy_helper.from_array(np.array(inv_std[0], np.float32), "uint8_input_scale")
    zero = numpy_helper.from_array(np.array(mean[0], np.uint8), "uint8_input_zero_point")
    graph.initializer.extend([scale, zero])
    for conv in users:
        # the int32 bias is quantised with scale x_scale * w_scale: rescale it to the new x_scale
        old_scale = float(numpy_helper.to_array(inits[conv.input[1]]))
        if len(conv.input) > 8 and conv.input[8]:
            bias = inits[conv.input[8]]
            values = numpy_helper.to_array(bias).astype(np.float64) * (old_scale / float(inv_std[0]))
            bias.CopyFrom(numpy_helper.from_array(np.round(values).astype(np.int32), bias.name))
        conv.input[0], conv.input[1], conv.input[2] = cast.input[0], scale.name, zero.name
    for dead in (quant, mul, sub, cast):
        if all(o not in {i for n in graph.node if n is not dead for i in n.input} for o in dead.output):
            graph.node.remove(dead)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def check_engine(model_dir: Path, runtime: str, precision: str) -> Path:
    """The compiled engine file for (runtime, precision), validated against the model it came from."""
    path = engine_path(model_dir, runtime, precision)
    settings = path.with_suffix(".json")
    export = f"lineguard export {model_dir} --runtime {runtime} --precision {precision}"
    if not path.is_file() or not settings.is_file():
        raise ArtifactError(f"{path} not found; build it first with: {export}")
    record = json.loads(settings.read_text())
    manifest = load_manifest(model_dir)
    if record.get("source_sha256") != manifest["files"]["model.onnx"]:
        raise ArtifactError(f"{path} was built from another model.onnx than this model's; rebuild it: {export}")
    if record.get("sha256") != sha256(path):
        raise ArtifactError(f"{path} was altered since it was built; rebuild it: {export}")
    return path
