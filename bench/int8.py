"""INT8 against fp32 in ONNX Runtime on this CPU: engine throughput (one run, same images,
interleaved repeats) and detection quality with the same bank, per dataset and calibration choice.

    python -m bench.int8                                  # every dataset, the default calibration
    python -m bench.int8 --datasets mvtec_subset/hazelnut --variants all   # compare the choices

Writes bench/results/int8-<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, DATASETS, ROOT
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, iter_batches
from calibration.evaluate import evaluate
from calibration.fit import FitConfig, fit
from calibration.int8 import Int8Config, engine_path, quantize_onnxruntime
from calibration.model import Deployment, InspectionModel
from engines.runtimes import OnnxRuntimeEngine

VARIANTS = {"default": [Int8Config()],
            "all": [Int8Config(m, pc) for m in ("minmax", "entropy", "percentile") for pc in (True, False)]}


def engine_speed(fp32: Path, int8: Path, images: np.ndarray, batch: int, threads: int, repeats: int = 9) -> dict:
    """ms per image of both engines on the same uint8 images, alternating runs (this machine's speed
    drifts): the best of each, and the median of the per-pair ratios."""
    engines = {"fp32": OnnxRuntimeEngine(fp32, images.shape[1], threads),
               "int8": OnnxRuntimeEngine(int8, images.shape[1], threads)}
    times = {k: [] for k in engines}
    for e in engines.values():
        e.activate()
        e.infer(images[:batch])
    for _ in range(repeats):
        for name, e in engines.items():
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                e.infer(images[i:i + batch])
            times[name].append(1000 * (time.perf_counter() - start) / len(images))
    for e in engines.values():
        e.deactivate()
    best = {k: min(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["fp32"], times["int8"])]
    return {"fp32_ms_per_image": best["fp32"], "int8_ms_per_image": best["int8"],
            "speedup": best["fp32"] / best["int8"], "median_pair_speedup": float(np.median(ratios)),
            "runs_ms": times, "batch": batch, "threads": threads, "images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--variants", choices=sorted(VARIANTS), default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for dataset in args.datasets:
        data = DATA / dataset
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            fit(data, model_dir, FitConfig(deployment=Deployment(threads=args.threads)))
            fp32 = evaluate(InspectionModel(model_dir, Deployment(threads=args.threads)), data, args.batch_size)
            paths = [s.path for s in evaluation_samples(data)][:64]
            images = np.concatenate([b for b, _ in iter_batches(paths, 256, 16)])
            rows = []
            for config in VARIANTS[args.variants]:
                record = quantize_onnxruntime(model_dir, config)
                int8 = evaluate(InspectionModel(model_dir, Deployment(precision="int8", threads=args.threads)), data,
                                args.batch_size)
                speed = engine_speed(model_dir / "model.onnx", engine_path(model_dir, "onnxruntime", "int8"), images,
                                     args.batch_size, args.threads)
                row = {"method": config.method, "per_channel": config.per_channel,
                       "calibration_images": len(record["calibration_images"]), "uint8_input": record["uint8_input"],
                       **speed, **{f"int8_{k}": int8[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")},
                       "image_auroc_delta": int8["image_auroc"] - fp32["image_auroc"],
                       "pixel_auroc_delta": int8["pixel_auroc"] - fp32["pixel_auroc"]}
                rows.append(row)
                print(f"{dataset:<24} {config.method:<10} {'per-channel' if config.per_channel else 'per-tensor ':<11} "
                      f"engine {row['fp32_ms_per_image']:.2f} -> {row['int8_ms_per_image']:.2f} ms/image "
                      f"(x{row['speedup']:.2f}, median pair x{row['median_pair_speedup']:.2f})  image AUROC {fp32['image_auroc']:.4f} -> {int8['image_auroc']:.4f}  "
                      f"pixel AUROC {fp32['pixel_auroc']:.4f} -> {int8['pixel_auroc']:.4f}", flush=True)
                shutil.rmtree(model_dir / "engines")
        result = {"dataset": dataset, "fp32": {k: fp32[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")},
                  "rows": rows, "machine": machine_info()}
        name = dataset.split("/")[-1] + ("" if args.variants == "default" else f"-{args.variants}")
        (ROOT / "bench" / "results" / f"int8-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
