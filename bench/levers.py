"""Every quality lever, one change at a time from the defaults, on every dataset, through the real
`lineguard fit` / `eval` (bench.accuracy.run); rows appended to bench/results/levers.json as they come.

    python -m bench.levers                         # all levers, all datasets
    python -m bench.levers --levers default stages-2-4-5 --datasets magnetic_tile/tile

A lever is a list of `lineguard fit` options; "ensemble" fuses the default bank with the default
reconstruction model (mean of their normalised maps; "ensemble-max" their maximum). Speeds in these rows come from a machine
that may be running other work: use bench.e2e for throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.accuracy import DATA, DATASETS, RESULTS, run
from calibration.artifact import machine_info
from pipeline.cli import main as lineguard

LEVERS: dict[str, list[str]] = {
    "default": [],
    "backbone-lite1": ["--backbone", "efficientnet_lite1"],
    "backbone-lite2": ["--backbone", "efficientnet_lite2"],
    "stages-2-3-4": ["--layers", "stage2,stage3,stage4"],
    "stages-2-4-5": ["--layers", "stage2,stage4,stage5"],
    "weighting-none": ["--weighting", "none"],
    "weighting-none-stages-2-4-5": ["--weighting", "none", "--layers", "stage2,stage4,stage5"],
    "dim-0": ["--dim", "0"],
    "dim-64": ["--dim", "64"],
    "bank-8k": ["--coreset-max", "8192"],
    "bank-32k": ["--coreset-max", "32768"],
    "index-flat": ["--index", "flat"],
    "index-ivf": ["--index", "ivf"],
    "score-max": ["--image-score", "max"],
    "score-top30": ["--top-k", "30", "--rerank", "36"],
    "blur-2": ["--blur-sigma", "2"],
    "blur-8": ["--blur-sigma", "8"],
    "context-16": ["--context", "16"],
    "pool-padding-include": ["--pool-padding", "include"],
    "pool-padding-exclude": ["--pool-padding", "exclude"],
    "stages-2-4-5-pool-include": ["--layers", "stage2,stage4,stage5", "--pool-padding", "include"],
    "input-320": ["--input-size", "320"],
    "reconstruction": ["--kind", "reconstruction"],
    "rec-epochs-4": ["--kind", "reconstruction", "--epochs", "4"],
    "rec-epochs-36": ["--kind", "reconstruction", "--epochs", "36"],
    "rec-epochs-100": ["--kind", "reconstruction", "--epochs", "100"],
    "rec-lr-1e-3": ["--kind", "reconstruction", "--lr", "1e-3"],
    "rec-lr-1e-2": ["--kind", "reconstruction", "--lr", "1e-2"],
    "rec-flip-features": ["--kind", "reconstruction", "--flip-features"],
}
EVAL = ["--threads", "2"]


def ensemble(dataset: str, fusion: str, members: Path) -> dict:
    """The default bank and reconstruction models fused (`fusion`: mean | max), evaluated as one model;
    the two are fitted once per dataset under `members`, for every fusion."""
    data = DATA / dataset
    folder = members / dataset.replace("/", "-")
    for name, args in (("bank", []), ("rec", ["--kind", "reconstruction"])):
        if not (folder / name).is_dir() and lineguard(["fit", str(data), "-o", str(folder / name), "--threads", "2",
                                                       *args]) != 0:
            raise SystemExit(f"fit {name} failed on {dataset}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if lineguard(["fuse", str(folder / "bank"), str(folder / "rec"), "-o", str(tmp / "ens"), "--fusion", fusion]):
            raise SystemExit("fuse failed")
        if lineguard(["eval", str(tmp / "ens"), str(data), "--json", str(tmp / "m.json"), *EVAL]) != 0:
            raise SystemExit("eval failed")
        result = json.loads((tmp / "m.json").read_text())
    return {"dataset": dataset, "metrics": {k: v for k, v in result.items() if k not in ("config", "curve_plots")},
            "fit_args": [f"fuse --fusion {fusion} (default bank, default reconstruction)"], "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="*", default=list(LEVERS) + ["ensemble", "ensemble-max"])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=RESULTS / "levers.json")
    args = parser.parse_args()
    rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    members = Path(tempfile.mkdtemp(prefix="levers-members-"))
    for lever in args.levers:
        for dataset in args.datasets:
            if lever.startswith("ensemble"):
                result = ensemble(dataset, "max" if lever == "ensemble-max" else "mean", members)
            else:
                result = run(dataset, [*LEVERS[lever], "--threads", "2"], EVAL)
            m = result["metrics"]
            row = {"lever": lever, "dataset": dataset, "fit_args": result["fit_args"],
                   **{k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_ap", "pixel_ap",
                                        "images_per_s")},
                   "per_type": {t: {k: round(v, 4) for k, v in pt.items() if isinstance(v, float)}
                                for t, pt in m["per_type"].items()},
                   "fit_seconds": result.get("manifest", {}).get("fit", {}).get("fit_seconds"),
                   "bank_size": result.get("manifest", {}).get("fit", {}).get("bank_size"),
                   "input": result.get("manifest", {}).get("input")}
            rows = [r for r in rows if (r["lever"], r["dataset"]) != (lever, dataset)] + [row]
            args.out.write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2) + "\n")
            print(f"{lever:<28} {dataset:<24} image {row['image_auroc']:.4f} pixel {row['pixel_auroc']:.4f} "
                  f"AU-PRO {row['pixel_aupro']:.4f} fit {row['fit_seconds']} s", flush=True)
    shutil.rmtree(members, ignore_errors=True)


if __name__ == "__main__":
    main()
