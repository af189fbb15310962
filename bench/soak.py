"""A soak: synthetic frames through `lineguard run` for M minutes while an inference worker is killed
(SIGKILL) every N seconds (but not in the stream's last 5 seconds, when a dead worker need not come
back); the RSS of every stage is sampled over time.

    python -m bench.soak --minutes 60 --kill-every 120      -> bench/results/soak-60min.json
    python -m bench.soak --minutes 2 --kill-every 40 --out /tmp/soak.json    (what CI runs, via the tests)

The number of frames is the rate of a short calibration run times the duration. Recorded: frames in
and out, lost, duplicates dropped by the sink, restarts, and per stage its RSS samples and the mean
RSS of the first and last 10 minutes after the first minute (a tenth of the rest for runs under 21
minutes; flat memory: within 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.accuracy import RESULTS
from calibration.artifact import machine_info
from calibration.synthetic import make_dataset
from engines.runtimes import Deployment
from pipeline.cli import main as lineguard
from pipeline.run import RunConfig, run_pipeline


def _children() -> dict[int, str]:
    """pid -> the stage name (the lineguard subcommand and --name) of this process's children."""
    out = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != me:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if "pipeline.cli" in words:
            stage = words[words.index("pipeline.cli") + 1]
            name = words[words.index("--name") + 1] if "--name" in words else stage
            out[int(entry.name)] = "infer" if stage == "worker" else name
    return out


def _logged(path: Path) -> int:
    """Verdicts in the sink's results.jsonl so far (it is written through)."""
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory_summary(series: list[list[float]], warm_up_s: float = 60.0, window_s: float = 600.0) -> dict:
    """RSS samples [[seconds, MB], ...] of one stage -> the means of the first and the last window
    after warm-up (10 minutes; a tenth of the rest when it is shorter than two windows) and their
    relative change."""
    later = [[t, rss] for t, rss in series if t >= warm_up_s] or series
    span = later[-1][0] - later[0][0]
    window = window_s if span >= 2 * window_s else span / 10
    first = [rss for t, rss in later if t <= later[0][0] + window]
    last = [rss for t, rss in later if t >= later[-1][0] - window]
    a, b = float(np.mean(first)), float(np.mean(last))
    return {"window_s": round(window, 1), "first_window_mb": a, "last_window_mb": b, "change": b / a - 1.0,
            "samples": series}


def soak(minutes: float, kill_every: float, batch: int = 8) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", n_train=16, n_good=1, n_defect=1)
        if lineguard(["fit", str(data), "-o", str(tmp / "model")]) != 0:
            raise SystemExit("fit failed")
        probe = run_pipeline(RunConfig(model=tmp / "model", frames=200, batch=batch))
        frames = int(probe["fps"] * 60 * minutes)
        samples: dict[str, list] = {}
        kills: list[dict] = []
        done = threading.Event()
        log = tmp / "out" / "results.jsonl"
        start = time.monotonic()

        def watch():
            last_kill = time.monotonic()
            while not done.wait(5.0):
                now = time.monotonic() - start
                for pid, name in _children().items():
                    rss = _rss_mb(pid)
                    if rss is not None:
                        samples.setdefault(name, []).append([round(now, 1), round(rss, 1)])
                if time.monotonic() - last_kill >= kill_every and _logged(log) < frames - 5 * probe["fps"]:
                    # not in the stream's last seconds: a worker that dies once every verdict is in needs no restart
                    workers = [pid for pid, name in _children().items() if name.startswith("infer")]
                    if workers:
                        os.kill(workers[0], signal.SIGKILL)
                        kills.append({"t": round(now, 1), "pid": workers[0]})
                    last_kill = time.monotonic()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            summary = run_pipeline(RunConfig(model=tmp / "model", frames=frames, batch=batch, retry_after=5.0,
                                             out=tmp / "out", overlays=False, deployment=Deployment()))
        finally:
            done.set()
            thread.join()
        lines = log.read_text().splitlines()
        seqs = [json.loads(line)["seq"] for line in lines]
    elapsed = time.monotonic() - start
    memory = {name: memory_summary(series) for name, series in samples.items()}
    return {"minutes": minutes, "elapsed_s": round(elapsed, 1), "kill_every_s": kill_every, "frames": frames,
            "frames_in": summary["frames_in"], "results": summary["results"], "lost": summary["lost"],
            "errors": summary["error"], "duplicates_dropped": summary["duplicates"],
            "logged": len(seqs), "logged_unique": len(set(seqs)), "kills": kills, "restarts": summary["restarts"],
            "fps": summary["fps"], "memory": memory, "machine": machine_info(), "commit": _commit()}


def _commit() -> str:
    """The git commit of the code that ran (the soak may run from a snapshot of the tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--kill-every", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = soak(args.minutes, args.kill_every)
    out = args.out or RESULTS / f"soak-{args.minutes:g}min.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    flat = {n: f"{m['change']:+.1%}" for n, m in result["memory"].items()}
    print(f"{result['frames_in']} frames in, {result['results']} results, {result['lost']} lost, "
          f"{result['duplicates_dropped']} duplicates dropped, {len(result['restarts'])} restarts; RSS change {flat}")


if __name__ == "__main__":
    main()
