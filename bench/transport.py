"""1920x1080 RGB frames over ipc between two processes: the wire layer vs raw pyzmq, alone.

    python -m bench.transport [--frames 600]     -> bench/results/transport.json
"""

from __future__ import annotations

import argparse
import json

from bench.accuracy import ROOT
from calibration.artifact import machine_info
from pipeline.benchmark import transport


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=600)
    args = parser.parse_args()
    result = {**transport(args.frames), "machine": machine_info()}
    (ROOT / "bench" / "results" / "transport.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wire {result['wire_fps']:.0f} vs raw {result['raw_fps']:.0f} frames/s: ratio {result['ratio']:.3f} "
          f"(pairs {', '.join(f'{r:.2f}' for r in result['pair_ratios'])}); CPU per frame "
          f"{result['cpu_ms_per_frame']['wire']:.2f} vs {result['cpu_ms_per_frame']['raw']:.2f} ms: "
          f"ratio {result['cpu_ratio']:.3f}")


if __name__ == "__main__":
    main()
