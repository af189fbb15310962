"""End to end from files: fit on a dataset, then `lineguard run` over its test folder (every image
read, sent, decoded, scored, postprocessed, results.jsonl, maps and overlays written), as a user
runs it, with the fp32 and the int8 engine alternately, several times each (this machine's speed
drifts; the median is reported).

    python -m bench.e2e --dataset magnetic_tile/tile [--repeats 3]

Writes bench/results/e2e-<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, ROOT
from calibration.artifact import machine_info
from calibration.fit import FitConfig, fit
from calibration.int8 import quantize_onnxruntime
from calibration.model import Deployment
from pipeline.run import RunConfig, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = DATA / args.dataset
    files = sum(1 for p in (data / "test").rglob("*") if p.is_file())
    runs: dict[str, list] = {"fp32": [], "int8": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        fit(data, model, FitConfig())
        quantize_onnxruntime(model)
        for _ in range(args.repeats):
            for precision in runs:
                out = Path(tmp) / "out"
                summary = run_pipeline(RunConfig(model=model, source=str(data / "test"), out=out,
                                                 batch=args.batch_size, deployment=Deployment(precision=precision)))
                shutil.rmtree(out)
                runs[precision].append({k: summary[k] for k in ("fps", "latency_ms", "results", "error", "lost")})
    result = {"dataset": args.dataset, "test_files": files, "batch": args.batch_size, "runs": runs,
              "median_fps": {k: float(np.median([r["fps"] for r in v])) for k, v in runs.items()},
              "machine": machine_info()}
    (ROOT / "bench" / "results" / f"e2e-{args.dataset.split('/')[-1]}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.dataset}: {files} files; images/s fp32 {result['median_fps']['fp32']:.1f}, int8 engine "
          f"{result['median_fps']['int8']:.1f} (median of {args.repeats}; runs "
          f"{[round(r['fps'], 1) for r in runs['fp32']]} / {[round(r['fps'], 1) for r in runs['int8']]})")


if __name__ == "__main__":
    main()
