"""What serving a model fitted on a CPU of another kind costs, and what timing its indexes again here
gives back: `lineguard run` end to end from files (as bench.e2e runs it, 2 cores, results, maps and
overlays written), in rounds of

- "here": the model as fitted on this CPU (index auto keeps the faster index here);
- "elsewhere": the same model as a fit on a CPU where the other index won writes it: that index in
  bank.faiss and named by the manifest, the fitting CPU another (`FOREIGN`). Served by this
  checkout, which times the candidates again on its first start and records its choice
  (calibration.memory_bank.served_bank);
- "elsewhere@REF": that model served by the code of commit REF, which serves bank.faiss as it is.

    python -m bench.index_choice --dataset magnetic_tile/tile --before d4013c2 --repeats 5
        -> bench/results/index-choice-<dataset>.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, RESULTS, ROOT
from bench.e2e import code_tree, lineguard
from calibration.artifact import machine_info, write_manifest

FOREIGN = "another CPU (emulated by bench.index_choice)"


def fitted_elsewhere(model: Path, out: Path) -> str:
    """A copy of `model` at `out` as a fit that kept the other candidate index writes it; the kind kept."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("engines"))
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["memory_bank"]
    banks = section["index_candidates"]["banks"]
    here = section["bank"]["index"]
    other = next(kind for kind in banks if kind != here)
    (out / "bank.faiss").rename(out / "swap")
    (out / banks[other]).rename(out / "bank.faiss")
    (out / "swap").rename(out / f"bank-{here}.faiss")
    section["index_candidates"].update(timed_on=FOREIGN, banks={other: "bank.faiss", here: f"bank-{here}.faiss"})
    section["bank"]["index"] = other
    section["bank"]["nprobe"] = section["index_timing"]["ivf"]["nprobe"]
    for key in ("format", "format_version", "files", "versions"):
        manifest.pop(key)
    write_manifest(out, manifest)
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--before", required=True, help="a commit whose code serves bank.faiss as it is")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    data = DATA / args.dataset
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lineguard(ROOT, "fit", str(data), "-o", str(tmp / "here"))
        manifest = json.loads((tmp / "here" / "manifest.json").read_text())
        kept_here = manifest["memory_bank"]["bank"]["index"]
        kept_elsewhere = fitted_elsewhere(tmp / "here", tmp / "elsewhere")
        served = {"here": ("here", ROOT), "elsewhere": ("elsewhere", ROOT),
                  f"elsewhere@{args.before}": ("elsewhere", code_tree(f"x@{args.before}", tmp))}
        for _ in range(args.repeats):
            for name, (model, tree) in served.items():
                out, summary_file = tmp / "out", tmp / "summary.json"
                start = time.perf_counter()
                lineguard(tree, "run", str(tmp / model), "--source", str(data / "test"), "--out", str(out),
                          "--json", str(summary_file))
                wall = time.perf_counter() - start
                summary = json.loads(summary_file.read_text())
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault(name, []).append({"fps": summary["fps"], "wall_s": round(wall, 2),
                                                  "results": summary["results"], "lost": summary["lost"]})
                print(f"{name}: {summary['fps']:.1f} images/s, {wall:.1f} s from command to exit", flush=True)
        records = [json.loads(p.read_text()) for p in (tmp / "elsewhere" / "engines").glob("index-*.json")]
    keys = list(runs)
    ratios = {f"{a} / {keys[0]}": [ra["fps"] / r0["fps"] for ra, r0 in zip(runs[a], runs[keys[0]])] for a in keys[1:]}
    result = {"dataset": args.dataset, "kept_here": kept_here, "kept_elsewhere": kept_elsewhere,
              "index_timing_at_fit": manifest["memory_bank"]["index_timing"], "record_written": records,
              "runs": runs, "median_fps": {k: float(np.median([r["fps"] for r in v])) for k, v in runs.items()},
              "first_wall_s": {k: v[0]["wall_s"] for k, v in runs.items()},
              "median_later_wall_s": {k: float(np.median([r["wall_s"] for r in v[1:]])) for k, v in runs.items()},
              "median_ratio": {k: float(np.median(v)) for k, v in ratios.items()}, "round_ratios": ratios,
              "method": "rounds of each model and code in turn, `lineguard run` with its defaults (2 workers on 2 "
                        "cores), results, maps and overlays written; the first round of 'elsewhere' includes "
                        "its timing of the candidate indexes",
              "machine": machine_info()}
    name = args.dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"index-choice-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("kept_here", "kept_elsewhere", "median_fps", "median_ratio",
                                             "first_wall_s", "median_later_wall_s")}, indent=1))


if __name__ == "__main__":
    main()
