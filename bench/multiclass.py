"""One model for several products (ADer's multi-class setting): fitted on the three datasets together,
evaluated on each, with the mean of ADer's metric set.

    python -m bench.multiclass [--kind reconstruction] [-- FIT OPTIONS]   -> bench/results/multiclass-<kind>.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.accuracy import DATA, DATASETS, RESULTS
from calibration.artifact import machine_info
from pipeline.cli import main as lineguard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="reconstruction")
    parser.add_argument("fit_args", nargs="*")
    args = parser.parse_args()
    datas = [str(DATA / d) for d in DATASETS]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        start = time.perf_counter()
        if lineguard(["fit", *datas, "-o", str(model), "--kind", args.kind, "--input-size", "256",
                      "--threads", "2", *args.fit_args]) != 0:
            raise SystemExit("fit failed")
        fit_seconds = time.perf_counter() - start
        if lineguard(["eval", str(model), *datas, "--json", str(Path(tmp) / "m.json"), "--threads", "2"]) != 0:
            raise SystemExit("eval failed")
        result = json.loads((Path(tmp) / "m.json").read_text())
    for m in result["categories"].values():
        m.pop("curves", None)
    out = {"kind": args.kind, "datasets": list(DATASETS), "fit_args": args.fit_args, "fit_seconds": fit_seconds,
           "categories": result["categories"], "mean": result["mean"], "machine": machine_info()}
    (RESULTS / f"multiclass-{args.kind}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["mean"]))


if __name__ == "__main__":
    main()
