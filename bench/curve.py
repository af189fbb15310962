"""The whole pipeline as standalone stages over tcp on this host, with CURVE (`--keys`) and without, in
alternating rounds: frames/s at the sink and the per-round ratio authorised / plain.

    python -m bench.curve [--frames 400] [--rounds 3]      -> bench/results/curve.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.accuracy import RESULTS
from calibration.artifact import machine_info
from calibration.synthetic import make_dataset
from pipeline.cli import main as lineguard
from pipeline.security import write_keys


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(model: Path, frames: int, keys: Path | None, folder: Path) -> dict:
    """Sink, postprocess, worker and producer as separate `lineguard` processes over tcp; the sink's summary."""
    p = {name: _port() for name in ("frames", "post", "results", "acks")}
    auth = ["--keys", str(keys)] if keys else []
    cli = [sys.executable, "-m", "pipeline.cli"]
    summary = folder / "summary.json"
    sink = subprocess.Popen(cli + ["sink", "--results", f"tcp://127.0.0.1:{p['results']}", "--streams", "1",
                                   "--acks", f"tcp://127.0.0.1:{p['acks']}", "--summary", str(summary), *auth])
    stages = [sink,
              subprocess.Popen(cli + ["postprocess", str(model), "--in", f"tcp://127.0.0.1:{p['post']}", "--sink",
                                      f"tcp://127.0.0.1:{p['results']}", *auth]),
              subprocess.Popen(cli + ["worker", str(model), "--frames", f"tcp://127.0.0.1:{p['frames']}", "--out",
                                      f"tcp://127.0.0.1:{p['post']}", "--threads", "2", *auth]),
              subprocess.Popen(cli + ["produce", "synthetic", "--frames", str(frames), "--frames-endpoint",
                                      f"tcp://127.0.0.1:{p['frames']}", "--sink", f"tcp://127.0.0.1:{p['results']}",
                                      "--acks", f"tcp://127.0.0.1:{p['acks']}", "--hold", "600", *auth])]
    try:
        sink.wait(timeout=600)
    finally:
        for proc in stages:
            if proc.poll() is None:
                proc.terminate()
        for proc in stages:
            proc.wait(timeout=30)
    result = json.loads(summary.read_text())
    summary.unlink()
    return {k: result[k] for k in ("fps", "results", "error", "lost", "rejected")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list] = {"plain": [], "curve": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", n_train=16, n_good=1, n_defect=1)
        if lineguard(["fit", str(data), "-o", str(tmp / "model")]) != 0:
            raise SystemExit("fit failed")
        write_keys(tmp / "keys")
        for i in range(args.rounds):
            for name in (("plain", "curve") if i % 2 == 0 else ("curve", "plain")):
                runs[name].append(one_run(tmp / "model", args.frames, tmp / "keys" if name == "curve" else None, tmp))
                print(name, runs[name][-1], flush=True)
    ratios = [c["fps"] / p["fps"] for c, p in zip(runs["curve"], runs["plain"])]
    result = {"frames": args.frames, "runs": runs, "round_ratios": ratios, "median_ratio": float(np.median(ratios)),
              "method": "standalone stages over tcp on one host, alternating rounds; frames/s at the sink",
              "machine": machine_info()}
    (RESULTS / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"CURVE / plain frames/s: median {result['median_ratio']:.3f} (rounds {[round(r, 3) for r in ratios]})")


if __name__ == "__main__":
    main()
