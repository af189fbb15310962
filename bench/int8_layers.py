"""Where an int8 engine's error comes from, layer by layer, on this CPU.

For each of the encoder's convolutions quantised alone (the rest float), the error of the model's
embeddings against fp32 on held-out normal training images, computed two ways from the same
quantised graph (QDQ format): in float (ONNX Runtime without graph optimisation runs
DequantizeLinear -> Conv -> QuantizeLinear: the error of int8 itself) and by ONNX Runtime's int8
kernels (its optimiser fuses the same nodes into QLinearConv). Where the two differ, the kernel
adds error of its own: on x86 without VNNI its u8s8 kernel sums pairs of products in int16
(vpmaddubsw), which saturates. Then the whole engine as `lineguard export` builds it, with 0 or 2 of the
first convolutions kept float and 8- or 7-bit weights (`Int8Config.float_convs`, `reduce_range`).

    python -m bench.int8_layers [--dataset mvtec_subset/hazelnut]

Writes bench/results/int8-layers-<dataset>.json (error: |e - e32| / |e32| over all embeddings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, RESULTS
from calibration.artifact import machine_info
from calibration.int8 import (QUANTISED_OPS, Int8Config, calibration_batches, calibration_images, calibration_reader,
                              quantize_onnxruntime, training_paths)
from engines.compiled import engine_path
from pipeline.cli import main as lineguard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mvtec_subset/hazelnut")
    parser.add_argument("--held-out", type=int, default=8, help="normal training images the errors are measured on")
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        if lineguard(["fit", str(DATA / args.dataset), "-o", str(model_dir)]):
            raise SystemExit(f"fit failed on {args.dataset}")
        calib = calibration_images(model_dir, Int8Config().images)
        batches = list(calibration_batches(model_dir, calib))
        # images the calibration did not see, or where it saw them all (hazelnut: 28), the first ones
        held = ([p for p in training_paths(model_dir) if p not in set(calib)] or training_paths(model_dir))[:args.held_out]
        inputs = np.concatenate(list(calibration_batches(model_dir, held, batch=len(held))))

        def run(path: Path, optimise: bool = True) -> np.ndarray:
            options = ort.SessionOptions()
            options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                                else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
                None, {"images": inputs})[0]

        reference = run(model_dir / "model.onnx")

        def error(out: np.ndarray) -> float:
            return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

        prepared = tmp / "prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(model_dir / "model.onnx"), str(prepared))
        nodes = onnx.load(str(prepared)).graph.node
        convs = [n for n in nodes if n.op_type == "Conv" and n.name.startswith("/encoder/")]
        layers = []
        for i, conv in enumerate(convs):
            out = tmp / f"conv{i}.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(prepared), str(out), calibration_reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                                nodes_to_exclude=[n.name for n in nodes if n is not conv])
            group = next((a.i for a in conv.attribute if a.name == "group"), 1)
            row = {"conv": i, "name": conv.name, "group": group, "int8_in_float": error(run(out, optimise=False)),
                   "int8_kernels": error(run(out))}
            layers.append(row)
            print(f"conv {i:2d} group {group:4d}  error computed in float {row['int8_in_float']:.4f}  "
                  f"by int8 kernels {row['int8_kernels']:.4f}", flush=True)
        engines = []
        for float_convs, reduce_range in ((0, False), (0, True), (2, False), (2, True)):
            config = Int8Config(float_convs=float_convs, reduce_range=reduce_range)
            (record,) = quantize_onnxruntime(model_dir, config, bar=None)
            out = run(engine_path(model_dir, "onnxruntime", "int8"))
            row = {"float_convs": float_convs, "reduce_range": reduce_range, "uint8_input": record["uint8_input"],
                   "error": error(out), "correlation": float(np.corrcoef(out.ravel(), reference.ravel())[0, 1])}
            engines.append(row)
            print(f"engine, {float_convs} first convolutions float, {7 if reduce_range else 8}-bit weights: "
                  f"error {row['error']:.4f}, correlation {row['correlation']:.4f}", flush=True)
    result = {"dataset": args.dataset, "held_out_images": len(held), "calibration": dataclasses.asdict(Int8Config()),
              "quantised_ops": list(QUANTISED_OPS), "layers": layers, "engines": engines, "machine": machine_info()}
    name = args.dataset.split("/")[-1]
    (RESULTS / f"int8-layers-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
