"""What `lineguard eval` holds and takes on large frames: one model fitted on a dataset enlarged N times
(as a multi-megapixel camera gives them, `bench.accuracy.enlarged_copy`), then evaluated by the code of
each NAME[@REF] in turn (this checkout, or commit REF's tree, as bench.e2e runs them), every round:
peak resident memory of the eval process (the kernel's ru_maxrss), wall seconds, and its metrics,
which must agree between the codes.

    python -m bench.eval_memory --dataset magnetic_tile/tile --enlarge 4 --codes head= before@1a040fd=
        -> bench/results/eval-memory-<dataset>.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.accuracy import DATA, RESULTS, ROOT, enlarged_copy
from bench.e2e import code_tree, lineguard
from calibration.artifact import machine_info
from calibration.images import file_size

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1max", "pixel_iou_max")


def evaluate(tree: Path, model: Path, data: Path, out: Path, threads: int) -> dict:
    """`lineguard eval` with the code of `tree`: its peak RSS in GB, wall seconds and metrics."""
    usage: dict = {}
    start = time.perf_counter()
    lineguard(tree, "eval", str(model), str(data), "--json", str(out), "--threads", str(threads), usage=usage)
    seconds = time.perf_counter() - start
    metrics = json.loads(out.read_text())
    per_type = {t: {k: v for k, v in m.items() if k in ("pixel_auroc", "pixel_aupro")} for t, m in metrics["per_type"].items()}
    return {**usage, "wall_s": round(seconds, 1), "metrics": {k: metrics[k] for k in KEYS}, "per_type": per_type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--enlarge", type=int, default=4, help="every image and mask enlarged this many times")
    parser.add_argument("--codes", nargs="+", default=["head="], help="NAME[@REF]= : the code each eval runs with")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    names = [c.rstrip("=") for c in args.codes]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = enlarged_copy(DATA / args.dataset, tmp / "data", args.enlarge) if args.enlarge > 1 else DATA / args.dataset
        images = [p for p in sorted((data / "test").rglob("*")) if p.is_file()]
        pixels = sum(h * w for h, w in (file_size(memoryview(p.read_bytes()), "png" if p.suffix.lower() == ".png" else "jpeg")
                                        for p in images))
        model = tmp / "model"
        lineguard(code_tree(names[0], tmp), "fit", str(data), "-o", str(model), "--threads", str(args.threads))
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                run = evaluate(code_tree(name, tmp), model, data, tmp / f"{len(runs[name])}-{name}.json".replace("@", "-"),
                               args.threads)
                runs[name].append(run)
                print(f"{name:<20} peak {run['peak_rss_gb']:.2f} GB  {run['wall_s']:.0f} s  "
                      + "  ".join(f"{k} {v:.4f}" for k, v in run["metrics"].items()), flush=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "*.py",
                            "pyproject.toml", "constraints.txt"], capture_output=True, text=True).stdout.strip()  # code, not docs
    result = {"dataset": args.dataset, "enlarge": args.enlarge, "test_images": len(images), "test_pixels": pixels,
              "fitted_by": names[0], "codes": {c: c.rstrip("=").split("@")[1] if "@" in c else head + ("+changes" if dirty else "")
                                              for c in args.codes},
              "runs": runs, "machine": machine_info()}
    name = args.dataset.split("/")[-1] + (f"-enlarge-{args.enlarge}" if args.enlarge > 1 else "") + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"eval-memory-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
