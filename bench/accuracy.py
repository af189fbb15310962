"""Fit and evaluate on the real datasets in ../shared/data; write bench/results/accuracy-<name>.json.

    python -m bench.accuracy                       # every dataset, default settings
    python -m bench.accuracy --datasets mvtec_subset/hazelnut --index hnsw --tag hnsw
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from calibration.artifact import machine_info
from calibration.evaluate import evaluate
from calibration.fit import FitConfig, fit
from calibration.int8 import quantize_onnxruntime
from calibration.model import Deployment, InspectionModel
from engines.banks import BankConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = ("mvtec_subset/hazelnut", "mpdd/metal_plate", "magnetic_tile/tile")


def run(dataset: str, config: FitConfig, batch_size: int, serve: Deployment) -> dict:
    """Fit with `config`, evaluate as `serve` runs (exporting the int8 engine first if asked)."""
    data = DATA / dataset
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(data, Path(tmp) / "model", config)
        if serve.precision == "int8":
            quantize_onnxruntime(Path(tmp) / "model")
        model = InspectionModel(Path(tmp) / "model", serve)
        metrics = evaluate(model, data, batch_size=batch_size)
    return {"dataset": dataset, "metrics": metrics, "fit": summary, "config": dataclasses.asdict(config),
            "serve": dataclasses.asdict(serve), "eval_batch_size": batch_size, "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--index", default="flat")
    parser.add_argument("--coreset-ratio", type=float, default=FitConfig.coreset_ratio)
    parser.add_argument("--coreset-max", type=int, default=FitConfig.coreset_max)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="onnxruntime engine")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args()
    config = FitConfig(bank=BankConfig(index=args.index), coreset_ratio=args.coreset_ratio,
                       coreset_max=args.coreset_max, deployment=Deployment(threads=args.threads))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        serve = Deployment(precision=args.precision, threads=args.threads)
        result = run(dataset, config, args.batch_size, serve)
        name = dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
        (out_dir / f"accuracy-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        m, f = result["metrics"], result["fit"]
        print(f"{dataset:<24} image AUROC {m['image_auroc']:.4f}  pixel AUROC {m['pixel_auroc']:.4f}  "
              f"AU-PRO {m['pixel_aupro']:.4f}  bank {f['bank_size']}x{f['dim']}  fit {f['fit_seconds']:.1f} s  "
              f"{m['images_per_s']:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
