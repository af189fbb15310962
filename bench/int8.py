"""INT8 against fp32 in ONNX Runtime on this CPU: engine throughput (one run, the same inputs,
interleaved repeats), the export's own validation, and detection quality with the same model.

    python -m bench.int8                                   # every dataset, the default calibration
    python -m bench.int8 --datasets mvtec_subset/hazelnut --variants all   # compare the choices
    python -m bench.int8 -- --kind reconstruction          # any lineguard fit option after --

Writes bench/results/int8-<dataset>[-<tag>].json. Where the engine fails validation on this CPU,
the row says so with the failures instead of speeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, DATASETS, RESULTS
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, read_frames
from calibration.evaluate import evaluate
from calibration.int8 import Int8Config, quantize_onnxruntime
from calibration.model import Model
from engines.compiled import engine_path
from engines.errors import ConfigError
from engines.runtimes import Deployment, OnnxRuntimeEngine
from pipeline.cli import main as lineguard

VARIANTS = {"default": [Int8Config()],
            "all": [Int8Config(m, pc) for m in ("minmax", "entropy", "percentile") for pc in (True, False)],
            # the AVX2 recipe's two parts (calibration.int8.cpu_recipe), each without the other, and both
            "recipes": [Int8Config(float_convs=f, reduce_range=r) for f, r in ((0, False), (2, False), (0, True), (2, True))]}
KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def engine_speed(fp32: Path, int8: Path, inputs: np.ndarray, batch: int, threads: int, repeats: int = 9) -> dict:
    """ms per input of both engines on the same uint8 inputs, alternating runs (this machine's speed
    drifts): the best of each, and the median of the per-pair ratios."""
    h, w = inputs.shape[1:3]
    engines = {"fp32": OnnxRuntimeEngine(fp32, h, w, threads), "int8": OnnxRuntimeEngine(int8, h, w, threads)}
    times = {k: [] for k in engines}
    for e in engines.values():
        e.activate()
        e.infer(inputs[:batch])
    for _ in range(repeats):
        for name, e in engines.items():
            start = time.perf_counter()
            for i in range(0, len(inputs), batch):
                e.infer(inputs[i:i + batch])
            times[name].append(1000 * (time.perf_counter() - start) / len(inputs))
    for e in engines.values():
        e.deactivate()
    best = {k: min(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["fp32"], times["int8"])]
    return {"fp32_ms_per_image": best["fp32"], "int8_ms_per_image": best["int8"],
            "speedup": best["fp32"] / best["int8"], "median_pair_speedup": float(np.median(ratios)),
            "runs_ms": times, "batch": batch, "threads": threads, "images": len(inputs)}


def model_inputs(model: Model, data: Path, count: int = 64) -> np.ndarray:
    out = []
    for layout, image in read_frames([s.path for s in evaluation_samples(data)][:count], model.geometer):
        buffer = np.empty((layout.count,) + model.spec.shape, np.uint8)
        model.geometer.prepare(image, layout, buffer)
        out.extend(buffer)
    return np.stack(out[:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--variants", choices=sorted(VARIANTS), default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("fit_args", nargs="*")
    args = parser.parse_args()
    for dataset in args.datasets:
        data = DATA / dataset
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            if lineguard(["fit", str(data), "-o", str(model_dir), "--threads", str(args.threads), *args.fit_args]):
                raise SystemExit(f"fit failed on {dataset}")
            model = Model(model_dir)
            fp32 = evaluate(model, data, Deployment(threads=args.threads), args.batch_size)
            inputs = model_inputs(model, data)
            for config in VARIANTS[args.variants]:
                row = {"method": config.method, "per_channel": config.per_channel,
                       "float_convs": config.float_convs, "reduce_range": config.reduce_range}
                try:
                    (record,) = quantize_onnxruntime(model_dir, config)
                except ConfigError as exc:
                    row.update(validated=False, refused=str(exc))
                    rows.append(row)
                    print(f"{dataset:<24} {config.method:<10} refused: {exc}", flush=True)
                    continue
                int8 = evaluate(Model(model_dir), data, Deployment(precision="int8", threads=args.threads),
                                args.batch_size)
                speed = engine_speed(model_dir / "model.onnx", engine_path(model_dir, "onnxruntime", "int8"), inputs,
                                     args.batch_size, args.threads)
                row.update(validated=True, validation=record["validation"],
                           calibration_images=len(record["calibration_images"]), float_convs=record["float_convs"],
                           reduce_range=record["reduce_range"], uint8_input=record["uint8_input"],
                           **speed, **{f"int8_{k}": int8[k] for k in KEYS},
                           image_auroc_delta=int8["image_auroc"] - fp32["image_auroc"],
                           pixel_auroc_delta=int8["pixel_auroc"] - fp32["pixel_auroc"])
                rows.append(row)
                print(f"{dataset:<24} {config.method:<10} {'per-channel' if config.per_channel else 'per-tensor ':<11} "
                      f"float convs {record['float_convs']}, {7 if record['reduce_range'] else 8}-bit weights "
                      f"engine {row['fp32_ms_per_image']:.2f} -> {row['int8_ms_per_image']:.2f} ms/input "
                      f"(x{row['speedup']:.2f}, median pair x{row['median_pair_speedup']:.2f})  image AUROC "
                      f"{fp32['image_auroc']:.4f} -> {int8['image_auroc']:.4f}  pixel AUROC {fp32['pixel_auroc']:.4f} "
                      f"-> {int8['pixel_auroc']:.4f}", flush=True)
                shutil.rmtree(model_dir / "engines")
        result = {"dataset": dataset, "fit_args": args.fit_args, "fp32": {k: fp32[k] for k in KEYS}, "rows": rows,
                  "machine": machine_info()}
        tags = [t for t in (args.variants if args.variants != "default" else "", args.tag) if t]
        name = dataset.split("/")[-1] + "".join(f"-{t}" for t in tags)
        (RESULTS / f"int8-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
