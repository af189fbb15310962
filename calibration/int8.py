"""INT8 engines from the model's own normal training images, validated before they are used.

ONNX Runtime: static quantisation of a model's ``model.onnx`` (any kind: its network's output
is embeddings or maps alike; an ensemble quantises each member), QOperator format, int8
weights, uint8 activations, with a calibration reader that feeds N training images, written to
``engines/onnxruntime-int8.onnx`` with its record (engines.compiled). TensorRT INT8 uses the
same images through `calibration_batches` (engines/tensorrt.py).

Validation: the new engine and fp32 score the same held-out normal training images and the
same images with planted defects; the map correlation, the AUROC of normal against planted
images and the pixel AUROC must hold (`ValidationBar`), or the engine is deleted and export
refuses, fp32 staying in use. ONNX Runtime's int8 kernels differ by instruction set (AVX2,
AVX-512, VNNI), so the record names the CPU features it was validated on and a worker on another
CPU refuses it until it is validated there.

Where the CPU has no VNNI, ONNX Runtime's u8s8 kernels (vpmaddubsw) sum pairs of uint8 x int8
products in int16, which saturates; VNNI (vpdpbusd) sums in int32. So the recipe depends on the
CPU (`cpu_recipe`): without VNNI the weights keep 7 bits (reduce_range: a pair sum is at most
2 x 255 x 64 < 2^15) and the encoder's first two convolutions (the stem and its depthwise
convolution) stay float. Measured on a real AVX2-only EPYC (bench/results/int8-layers-hazelnut.json,
int8-*-avx2.json): each convolution quantised alone, the kernel's error on the embeddings of the
stem and of several early dense convolutions is far above the same quantisation computed in float
(0.83 against 0.27 for the stem, 0.16 against 0.02 for the 12th convolution), while depthwise
convolutions match it (they sum in int32); the first
depthwise convolution's own error (0.33, the same on every CPU) is the largest of any layer. With
8-bit weights and the stem float, magnetic_tile's pixel AUROC fell from 0.8403 to 0.8112; with 7
it is 0.8409. With VNNI the stem is int8 and reads the uint8 image.

Only the encoder (the backbone) is quantised. The preprocessing at its head (Cast, Sub, Mul) and
the embedding's final scaling stay in float: quantising them cost more in (de)quantisation than
it saved; a reconstruction decoder and its cosine distances stay float because the maps are
differences of features, where int8's error is not small. Which ops, which method and
per-channel weights were chosen by measurement (bench/results/int8-*.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration import metrics
from calibration.artifact import ArtifactError, load_manifest
from calibration.dataset import read_frames, read_images, train_images
from calibration.images import resize
from engines.compiled import cpu_features, engine_path, write_record
from engines.errors import ConfigError, MissingExtraError
from engines.runtimes import Deployment

METHODS = ("minmax", "entropy", "percentile")
QUANTISED_OPS = ("Conv", "Clip", "Add", "AveragePool", "Concat", "Resize", "Transpose")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """method: activation range calibration; per_channel: per-output-channel weight scales;
    images: how many normal training images calibrate (evenly spread over the sorted list);
    float_convs: the encoder's first convolutions kept float; reduce_range: 7-bit weights (None, for
    either: as `cpu_recipe` says for this CPU)."""

    method: str = "minmax"
    per_channel: bool = True
    images: int = 32
    float_convs: int | None = None
    reduce_range: bool | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.images < 1:
            raise ConfigError(f"calibration images {self.images} must be at least 1")
        if self.float_convs is not None and self.float_convs < 0:
            raise ConfigError(f"float convolutions {self.float_convs} must be at least 0")


def cpu_recipe(features: list[str]) -> tuple[int, bool]:
    """(float_convs, reduce_range) for a CPU with these features: with VNNI (int32 sums) (0, False);
    without, where int16 pair sums saturate, (2, True) (see the module notes)."""
    return (0, False) if {"avx512_vnni", "avx_vnni"} & set(features) else (2, True)


@dataclasses.dataclass(frozen=True)
class ValidationBar:
    """What an int8 engine must keep of fp32 on held-out images: map correlation, and the drift of
    the image AUROC (normal vs planted defects) and of the pixel AUROC (planted masks)."""

    map_correlation: float = 0.8
    image_auroc_drop: float = 0.01
    pixel_auroc_drop: float = 0.005
    images: int = 16


def training_paths(model_dir: Path, data: str | Path | None = None) -> list[Path]:
    manifest = load_manifest(model_dir)
    sources = [data] if data else manifest.get("fit", {}).get("data")
    if not sources:
        raise ArtifactError(f"{model_dir}: the manifest does not say which images it was fitted on; "
                            "pass --data DIR with the normal training images")
    sources = sources if isinstance(sources, list) else [sources]
    return [p for s in sources for p in train_images(s)]


def calibration_images(model_dir: Path, count: int, data: str | Path | None = None) -> list[Path]:
    """`count` training images of the model, evenly spread over the sorted list (deterministic)."""
    paths = training_paths(model_dir, data)
    picks = np.linspace(0, len(paths) - 1, num=min(count, len(paths))).round().astype(int)
    return [paths[i] for i in np.unique(picks)]


def calibration_batches(model_dir: Path, paths: list[Path], batch: int = 1) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, 3] batches of the model's inputs of the calibration images, as the engine sees them."""
    from calibration.model import Model

    model = Model(model_dir)
    inputs = []
    for layout, image in read_frames(paths, model.geometer):
        out = np.empty((layout.count,) + model.spec.shape, np.uint8)
        model.geometer.prepare(image, layout, out)
        inputs.extend(out)
        while len(inputs) >= batch:
            yield np.stack(inputs[:batch])
            inputs = inputs[batch:]
    if inputs:
        yield np.stack(inputs)


def calibration_reader(batches: list[np.ndarray]):
    """ONNX Runtime's CalibrationDataReader over uint8 [B, H, W, 3] batches, fed as the graph's "images"."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"images": batch}

    return Reader()


def quantize_onnxruntime(model_dir: str | Path, config: Int8Config = Int8Config(), data: str | Path | None = None,
                         bar: ValidationBar | None = ValidationBar()) -> list[dict]:
    """Write and validate engines/onnxruntime-int8.onnx for the model (each member of an ensemble);
    returns the records. bar None skips validation (measurements only)."""
    from calibration.kinds import get_kind

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    records = []
    for part in get_kind(manifest["kind"]).parts(model_dir, manifest):
        records.append(_quantize_part(part, config, data, bar))
    return records


def _quantize_part(model_dir: Path, config: Int8Config, data: str | Path | None, bar: ValidationBar | None) -> dict:
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingExtraError("onnxruntime quantization tools are missing; pip install onnxruntime") from None

    paths = calibration_images(model_dir, config.images, data)
    batches = list(calibration_batches(model_dir, paths))

    out = engine_path(model_dir, "onnxruntime", "int8")
    out.parent.mkdir(exist_ok=True)
    float_convs, reduce_range = cpu_recipe(cpu_features())
    float_convs = float_convs if config.float_convs is None else config.float_convs
    reduce_range = reduce_range if config.reduce_range is None else config.reduce_range
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    start = time.perf_counter()
    chatter = io.StringIO()  # the quantisation tools print model fragments and progress
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(chatter), _quiet_logging():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / "model.onnx"), str(prepared))
        import onnx

        # the encoder (the backbone) only: a reconstruction decoder and its cosine distances stay float,
        # and so do the encoder's first `float_convs` convolutions
        nodes = onnx.load(str(prepared)).graph.node
        float_nodes = [n.name for n in nodes if not n.name.startswith("/encoder/")]
        float_nodes += [n.name for n in nodes if n.op_type == "Conv" and n.name.startswith("/encoder/")][:float_convs]
        quantize_static(str(prepared), str(out), calibration_reader(batches), quant_format=QuantFormat.QOperator,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=float_nodes,
                        reduce_range=reduce_range)
    uint8_input = feed_uint8_input(out)
    record = {"runtime": "onnxruntime", "precision": "int8", "engine": str(out), **dataclasses.asdict(config),
              "float_convs": float_convs, "reduce_range": reduce_range, "uint8_input": uint8_input,
              "quantised_ops": list(QUANTISED_OPS), "format": "QOperator", "weights": "int8", "activations": "uint8",
              "calibration_images": [str(p) for p in paths], "cpu_features": cpu_features(),
              "seconds": round(time.perf_counter() - start, 2)}
    record = write_record(out, record)
    if bar is not None:
        try:
            validation = validate_int8(model_dir, bar, data, exclude=set(paths))
        except BaseException:  # Ctrl-C too: an engine never validated must not stay to be served
            _remove(out)
            raise
        if not validation["passed"]:
            _remove(out)
            raise ConfigError(
                f"the int8 engine of {model_dir} fails validation on this CPU "
                f"({', '.join(cpu_features()) or 'none of the features listed'}): "
                f"{'; '.join(validation['failures'])}; it was not kept, the model serves fp32 (--precision fp32)")
        record = write_record(out, {**{k: v for k, v in record.items() if k not in ("sha256", "source_sha256")},
                                    "validation": validation})
    return record


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def validate_int8(model_dir: Path, bar: ValidationBar = ValidationBar(), data: str | Path | None = None,
                  exclude: set | None = None) -> dict:
    """fp32 against int8 on held-out normal training images and the same images with planted defects."""
    from calibration.model import Inspector, Model
    from calibration.synthetic import DEFECT_TYPES, plant_defect

    model = Model(model_dir)
    h, w = model.spec.height, model.spec.width
    paths = [p for p in training_paths(model_dir, data) if p not in (exclude or set())] or training_paths(model_dir, data)
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(bar.images, len(paths))).round().astype(int))
    rng = np.random.default_rng(0)
    frames, masks, labels = [], [], []
    for k, image in enumerate(read_images([paths[i] for i in picks], bits=model.geometry.bits)):
        normal = resize(image, max(h, w), max(h, w))  # square for plant_defect; resized back by the geometry
        planted, mask = plant_defect(normal, rng, DEFECT_TYPES[k % len(DEFECT_TYPES)])
        frames += [normal, planted]
        masks += [np.zeros(mask.shape, bool), mask > 0]
        labels += [0, 1]
    outputs = {}
    for precision in ("fp32", "int8"):
        with Inspector(model, Deployment(precision=precision), batch=8) as inspector:
            results = inspector.inspect(frames)
        outputs[precision] = ([model.frame_map(r.canvas_map, r.layout) for r in results],
                              np.array([r.score for r in results]))
    (m32, s32), (m8, s8) = outputs["fp32"], outputs["int8"]
    corr = _correlation(m32, m8)
    labels = np.array(labels)
    normal_corr = _correlation([m for m, y in zip(m32, labels) if not y], [m for m, y in zip(m8, labels) if not y])
    image32, image8 = metrics.roc_auc(s32, labels), metrics.roc_auc(s8, labels)
    pixel32 = metrics.pixel_metrics(m32, masks)["auroc"]
    pixel8 = metrics.pixel_metrics(m8, masks)["auroc"]
    failures = []
    if not corr >= bar.map_correlation:
        failures.append(f"map correlation with fp32 {corr:.3f} < {bar.map_correlation}")
    if image32 - image8 > bar.image_auroc_drop:
        failures.append(f"image AUROC {image32:.3f} -> {image8:.3f} (allowed drop {bar.image_auroc_drop})")
    if pixel32 - pixel8 > bar.pixel_auroc_drop:
        failures.append(f"pixel AUROC {pixel32:.4f} -> {pixel8:.4f} (allowed drop {bar.pixel_auroc_drop})")
    return {"passed": not failures, "failures": failures, "map_correlation": corr,
            "normal_map_correlation": normal_corr, "image_auroc": [image32, image8],
            "pixel_auroc": [pixel32, pixel8], "images": len(frames), "bar": dataclasses.asdict(bar),
            "cpu_features": cpu_features()}


def _correlation(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Pearson correlation of two lists of maps, all their cells together."""
    return float(np.corrcoef(np.concatenate([m.ravel() for m in a]), np.concatenate([m.ravel() for m in b]))[0, 1])


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
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True
