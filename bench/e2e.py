"""End to end from files: fit on a dataset, then `lineguard run` over its test folder (every image read,
sent, decoded, scored, postprocessed, results.jsonl, maps and overlays written), as a user runs it,
with each engine in turn, several times (this machine's speed drifts; medians and the per-round
ratios are reported). images/s counts from the first frame read to the last result; wall_s is what
the user waits, from the command to its exit (the stages' start-up and shutdown included);
cpu_ms_per_result is, per role (supervisor, producer, workers together, postprocess, sink), the CPU
its processes used once the producer started, per result (`StageCpu`, from /proc).

    python -m bench.e2e --dataset magnetic_tile/tile [--repeats 3] [--engines fp32 int8] [--workers 1 2] [-- FIT OPTS]
    python -m bench.e2e --dataset magnetic_tile/tile --models bank=--kind,memory_bank rec=--kind,reconstruction
    python -m bench.e2e --no-out --tag no-out    # the line without writing results, maps and overlays
    python -m bench.e2e --batch-size 2 4 8 --workers 2 --tag batch    # batch sizes in the same rounds
    python -m bench.e2e --workers 0 8 --threads 0 2 --engines fp32    # worker and thread counts
    python -m bench.e2e --models default= today@7a955b5=   # against the code of a commit, its own defaults
    python -m bench.e2e --dataset mvtec_subset/hazelnut --enlarge 4 --models scaled= full=--jpeg-decode,full

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

from bench.accuracy import DATA, RESULTS, ROOT, enlarged_copy
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


def lineguard(tree: Path, *args: str, refusal_ok: bool = False, cpu: dict | None = None,
              usage: dict | None = None) -> str | None:
    """`lineguard ARGS` with the code of `tree` (its stage processes inherit it). refusal_ok: a user
    error (exit 2, e.g. an int8 engine that fails validation on this CPU) is returned, not fatal.
    cpu: filled with `StageCpu`'s seconds per role while it runs. usage: filled with the command's own
    process's peak resident memory, "peak_rss_gb" (the kernel's ru_maxrss)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=tree, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        sampler = StageCpu(proc.pid) if cpu is not None else None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if sampler is not None:
                sampler.sample()
            time.sleep(SAMPLE_S)
        if usage is not None:
            usage["peak_rss_gb"] = round(rusage.ru_maxrss / 1e6, 3)
        if sampler is not None:
            cpu.update(sampler.seconds())
        err.seek(0)
        stderr = err.read()
    if refusal_ok and proc.returncode == 2:
        return stderr.strip().splitlines()[-1]
    if proc.returncode != 0:
        raise SystemExit(f"lineguard {' '.join(args[:2])} ({tree}) failed:\n{stderr[-3000:]}")
    return None


SAMPLE_S = 0.05
ROLES = ("produce", "worker", "postprocess", "sink")


class StageCpu:
    """CPU seconds (user + system, every thread) of a `lineguard run`'s processes by role (the
    supervisor "run", then ROLES) from /proc, sampled every SAMPLE_S: what each used after the
    producer appeared (the stages are ready by then, so their start-up is left out), the producer
    from when the workers took up frames (its own start-up left out too); the last SAMPLE_S of each
    process is not seen. Empty where /proc is not Linux's."""

    def __init__(self, root: int):
        self.root = root
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds at the latest sample)
        self.base: dict[int, float] | None = None  # pid -> CPU seconds when the producer appeared
        self.ready_workers = 0.0  # the workers' CPU seconds then
        self.flowing = False  # whether the workers have started on frames (the producer's base is then set)

    def _read(self, pid: int) -> tuple[int, float] | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick  # ppid, utime + stime

    def sample(self) -> None:
        if not Path("/proc/self/stat").exists():
            return
        stats = {int(p.name): self._read(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
        children: dict[int, list[int]] = {}
        for pid, stat in stats.items():
            if stat is not None:
                children.setdefault(stat[0], []).append(pid)
        todo, found = [self.root], []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        for pid in found:
            if stats.get(pid) is None:
                continue
            if pid == self.root:
                role = "run"
            else:
                try:
                    words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                role = next((w for w in words if w in ROLES), None)
                if role is None:
                    continue
            self.last[pid] = (role, stats[pid][1])
        workers = sum(cpu for role, cpu in self.last.values() if role == "worker")
        if self.base is None and any(role == "produce" for role, _ in self.last.values()):
            self.base = {pid: cpu for pid, (role, cpu) in self.last.items() if role != "produce"}
            self.ready_workers = workers
        elif self.base is not None and not self.flowing and workers > self.ready_workers + 0.02:
            self.flowing = True  # the workers took up frames: the producer's start-up is behind it
            self.base.update({pid: cpu for pid, (role, cpu) in self.last.items() if role == "produce"})

    def seconds(self) -> dict[str, float]:
        """role -> CPU seconds after the producer appeared (processes started later count in full)."""
        if self.base is None:
            return {}
        out: dict[str, float] = {}
        for pid, (role, cpu) in self.last.items():
            out[role] = out.get(role, 0.0) + cpu - self.base.get(pid, 0.0)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8],
                        help="batch sizes to compare (frames an inference worker scores together, at most)")
    parser.add_argument("--engines", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--models", nargs="+", default=["default="],
                        help="NAME=comma,separated,fit,options models to compare (default: one, default settings)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1],
                        help="inference worker counts to compare (threads: the cores shared among them)")
    parser.add_argument("--threads", nargs="+", type=int, default=[0],
                        help="threads per inference worker to compare (0: run's default, the usable cores shared "
                             "among the workers)")
    parser.add_argument("--no-out", action="store_true",
                        help="write nothing (no results.jsonl, maps or overlays): the line's speed without the output "
                             "work, which grows with the frames judged defective")
    parser.add_argument("--enlarge", type=int, default=1,
                        help="fit and run on a copy with every image enlarged N times and saved as a JPEG "
                             "(bench.accuracy.enlarged_copy): large camera frames")
    parser.add_argument("--tag", default="")
    parser.add_argument("fit_args", nargs="*", help="lineguard fit options for every model (after --)")
    args = parser.parse_args()
    data = DATA / args.dataset
    specs = dict(m.split("=", 1) for m in args.models)
    runs: dict[str, list] = {}
    refused: dict[str, str] = {}  # model -> why its int8 export was refused on this CPU
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.enlarge > 1:
            data = enlarged_copy(data, tmp / "data", args.enlarge)
        files = sum(1 for p in (data / "test").rglob("*") if p.is_file())
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
                for precision, workers, batch, threads in (
                        (p, w, b, t) for p in args.engines for w in args.workers for b in args.batch_size
                        for t in args.threads if not (p == "int8" and name in refused)):
                    out, summary_file = tmp / "out", tmp / "summary.json"
                    start, cpu = time.perf_counter(), {}
                    lineguard(trees[name], "run", str(tmp / name), "--source", str(data / "test"),
                              *([] if args.no_out else ["--out", str(out)]), "--json", str(summary_file),
                              "--batch-size", str(batch), "--workers", str(workers),
                              "--precision", precision, *(["--threads", str(threads)] if threads else []), cpu=cpu)
                    wall = time.perf_counter() - start
                    summary = json.loads(summary_file.read_text())
                    shutil.rmtree(out, ignore_errors=True)
                    key = (f"{name}/{precision}" + (f"/{workers}-workers" if workers != 1 else "")
                           + (f"/batch-{batch}" if len(args.batch_size) > 1 else "")
                           + (f"/threads-{threads or 'auto'}" if len(args.threads) > 1 else ""))
                    runs.setdefault(key, []).append(
                        {**{k: summary[k] for k in ("fps", "latency_ms", "results", "error", "lost", "stage_ms")},
                         "wall_s": round(wall, 2),
                         "cpu_ms_per_result": {role: round(1000 * sec / max(summary["results"], 1), 2)
                                               for role, sec in cpu.items()}})
                    print(f"{key}: {summary['fps']:.1f} images/s, {wall:.1f} s from command to exit", flush=True)
    keys = list(runs)
    ratios = {f"{a} / {keys[0]}": [ra["fps"] / r0["fps"] for ra, r0 in zip(runs[a], runs[keys[0]])] for a in keys[1:]}
    batch = args.batch_size[0] if len(args.batch_size) == 1 else args.batch_size
    result = {"dataset": args.dataset, "enlarged": args.enlarge, "test_files": files, "batch": batch, "models": specs,
              "workers": args.workers, "threads": args.threads,
              "written": "nothing" if args.no_out else "results.jsonl, maps, overlays",
              "fit_args": args.fit_args, "runs": runs, "int8_refused": refused,
              "median_fps": {k: float(np.median([r["fps"] for r in v])) for k, v in runs.items()},
              "median_wall_s": {k: float(np.median([r["wall_s"] for r in v])) for k, v in runs.items()},
              "median_cpu_ms_per_result": {k: {role: float(np.median([r["cpu_ms_per_result"].get(role, np.nan)
                                                                      for r in v]))
                                                for role in v[0]["cpu_ms_per_result"]} for k, v in runs.items()},
              "median_ratio": {k: float(np.median(v)) for k, v in ratios.items()}, "round_ratios": ratios,
              "method": "rounds of every model and engine in turn; medians of the rounds and of the per-round ratios",
              "machine": machine_info()}
    name = args.dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"e2e-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.dataset}: {files} files; median images/s {json.dumps(result['median_fps'])}; "
          f"ratios {json.dumps(result['median_ratio'])}")


if __name__ == "__main__":
    main()
