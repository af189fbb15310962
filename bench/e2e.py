"""End to end from files: fit on a dataset, then `lineguard run` over its test folder (every
image read, sent, decoded, scored, postprocessed and written to results.jsonl), as a user runs it.

    python -m bench.e2e --dataset magnetic_tile/tile [--precision int8 --bank-precision int8]

Writes bench/results/e2e-<dataset>-<precision>-<bank precision>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from bench.accuracy import DATA, ROOT
from calibration.artifact import machine_info
from calibration.fit import FitConfig, fit
from calibration.int8 import quantize_onnxruntime
from calibration.model import Deployment
from pipeline.run import RunConfig, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--bank-precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = DATA / args.dataset
    deployment = Deployment(precision=args.precision, bank_precision=args.bank_precision)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        fit(data, model, FitConfig())
        if args.precision == "int8":
            quantize_onnxruntime(model)
        summary = run_pipeline(RunConfig(model=model, source=str(data / "test"), out=Path(tmp) / "out",
                                         batch=args.batch_size, deployment=deployment))
        files = sum(1 for p in (data / "test").rglob("*") if p.is_file())
    result = {"dataset": args.dataset, "test_files": files, "deployment": dataclasses.asdict(deployment),
              "summary": summary, "machine": machine_info()}
    name = f"e2e-{args.dataset.split('/')[-1]}-{args.precision}-{args.bank_precision}"
    (ROOT / "bench" / "results" / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lat = summary["latency_ms"]
    print(f"{args.dataset} {args.precision}/{args.bank_precision}: {summary['results']} of {files} files, "
          f"{summary['fps']:.1f} images/s, latency p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms, "
          f"{summary['error']} errors")


if __name__ == "__main__":
    main()
