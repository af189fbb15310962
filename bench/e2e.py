"""End to end from files: fit on a dataset, then `lineguard run` over its test folder (every image read,
sent, decoded, scored, postprocessed, results.jsonl, maps and overlays written), as a user runs it,
with each engine in turn, several times (this machine's speed drifts; medians and the per-round
ratios are reported). images/s counts from the first frame read to the last result; wall_s is what
the user waits, from the command to its exit (the stages' start-up and shutdown included).

    python -m bench.e2e --dataset magnetic_tile/tile [--repeats 3] [--engines fp32 int8] [--workers 1 2] [-- FIT OPTIONS]
    python -m bench.e2e --dataset magnetic_tile/tile --models bank=--kind,memory_bank rec=--kind,reconstruction
    python -m bench.e2e --no-out --tag no-out    # the line without writing results, maps and overlays
    python -m bench.e2e --models default= today@7a955b5=   # against the code of a commit, its own defaults

Each model is fitted and run by the `lineguard` command of its code: this checkout, or for a name
NAME@REF the tree of git commit REF (extracted with `git archive`, run on this environment's
packages), so a comparison with an earlier version is one run, as a ratio.

Writes bench/results/e2e-<dataset>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, RESULTS, ROOT
from calibration.artifact import machine_info


def code_tree(name: str, tmp: Path) -> Path:
    """The code a model NAME[@REF] runs with: this checkout, or commit REF's tree under tmp."""
    if "@" not in name:
        return ROOT
    ref = name.split("@", 1)[1]
    tree = tmp / f"code-{ref}"
    if not tree.is_dir():
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=False)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode().strip()}; name a commit of this repo")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def lineguard(tree: Path, *args: str, refusal_ok: bool = False) -> str | None:
    """`lineguard ARGS` with the code of `tree` (its stage processes inherit it). refusal_ok: a user
    error (exit 2, e.g. an int8 engine that fails validation on this CPU) is returned, not fatal."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tree, env=env, capture_output=True,
                          text=True, check=False)
    if refusal_ok and proc.returncode == 2:
        return proc.stderr.strip().splitlines()[-1]
    if proc.returncode != 0:
        raise SystemExit(f"lineguard {' '.join(args[:2])} ({tree}) failed:\n{proc.stderr[-3000:]}")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--models", nargs="+", default=["default="],
                        help="NAME=comma,separated,fit,options models to compare (default: one, default settings)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1],
                        help="inference worker counts to compare (threads: the cores shared among them)")
    parser.add_argument("--no-out", action="store_true",
                        help="write nothing (no results.jsonl, maps or overlays): the line's speed without the output "
                             "work, which grows with the frames judged defective")
    parser.add_argument("--tag", default="")
    parser.add_argument("fit_args", nargs="*", help="lineguard fit options for every model (after --)")
    args = parser.parse_args()
    data = DATA / args.dataset
    files = sum(1 for p in (data / "test").rglob("*") if p.is_file())
    specs = dict(m.split("=", 1) for m in args.models)
    runs: dict[str, list] = {}
    refused: dict[str, str] = {}  # model -> why its int8 export was refused on this CPU
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {name: code_tree(name, tmp) for name in specs}
        for name, options in specs.items():
            extra = [o for o in options.split(",") if o]
            lineguard(trees[name], "fit", str(data), "-o", str(tmp / name), *extra, *args.fit_args)
            if "int8" in args.engines:
                why = lineguard(trees[name], "export", str(tmp / name), "--precision", "int8", refusal_ok=True)
                if why:
                    refused[name] = why
                    print(f"{name}: int8 refused: {why}", flush=True)
        for _ in range(args.repeats):
            for name in specs:
                for precision, workers in ((p, w) for p in args.engines for w in args.workers
                                           if not (p == "int8" and name in refused)):
                    out, summary_file = tmp / "out", tmp / "summary.json"
                    start = time.perf_counter()
                    lineguard(trees[name], "run", str(tmp / name), "--source", str(data / "test"),
                              *([] if args.no_out else ["--out", str(out)]), "--json", str(summary_file),
                              "--batch-size", str(args.batch_size), "--workers", str(workers),
                              "--precision", precision)
                    wall = time.perf_counter() - start
                    summary = json.loads(summary_file.read_text())
                    shutil.rmtree(out, ignore_errors=True)
                    key = f"{name}/{precision}" + (f"/{workers}-workers" if workers != 1 else "")
                    runs.setdefault(key, []).append(
                        {**{k: summary[k] for k in ("fps", "latency_ms", "results", "error", "lost", "stage_ms")},
                         "wall_s": round(wall, 2)})
                    print(f"{key}: {summary['fps']:.1f} images/s, {wall:.1f} s from command to exit", flush=True)
    keys = list(runs)
    ratios = {f"{a} / {keys[0]}": [ra["fps"] / r0["fps"] for ra, r0 in zip(runs[a], runs[keys[0]])] for a in keys[1:]}
    result = {"dataset": args.dataset, "test_files": files, "batch": args.batch_size, "models": specs,
              "workers": args.workers, "written": "nothing" if args.no_out else "results.jsonl, maps, overlays",
              "fit_args": args.fit_args, "runs": runs, "int8_refused": refused,
              "median_fps": {k: float(np.median([r["fps"] for r in v])) for k, v in runs.items()},
              "median_wall_s": {k: float(np.median([r["wall_s"] for r in v])) for k, v in runs.items()},
              "median_ratio": {k: float(np.median(v)) for k, v in ratios.items()}, "round_ratios": ratios,
              "method": "rounds of every model and engine in turn; medians of the rounds and of the per-round ratios",
              "machine": machine_info()}
    name = args.dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"e2e-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.dataset}: {files} files; median images/s {json.dumps(result['median_fps'])}; "
          f"ratios {json.dumps(result['median_ratio'])}")


if __name__ == "__main__":
    main()
