"""Few-shot memory banks: K = 1, 2, 4, 8 normal images (and their flipped views) on every dataset.

    python -m bench.fewshot [--shots 1 2 4 8] [--augment flips]    -> bench/results/fewshot.json
"""

from __future__ import annotations

import argparse
import json

from bench.accuracy import DATASETS, RESULTS, run
from calibration.artifact import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--augment", default="flips")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for k in args.shots:
            result = run(dataset, ["--shots", str(k), "--augment", args.augment, "--threads", "2"], ["--threads", "2"])
            m = result["metrics"]
            rows.append({"dataset": dataset, "shots": k, "augment": args.augment,
                         **{key: m[key] for key in ("image_auroc", "pixel_auroc", "pixel_aupro")},
                         "bank_size": result["manifest"]["fit"]["bank_size"],
                         "fit_seconds": result["manifest"]["fit"]["fit_seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    (RESULTS / "fewshot.json").write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
