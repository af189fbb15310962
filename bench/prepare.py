"""What an inference worker pays to turn a grey camera frame (Mono8) into a model input: widened to RGB
first and then resized (the code before a79bd56) against resized in its one channel and widened after
(`Geometer.prepare` now: the same input, checked here), one thread, milliseconds per frame (median of
5 passes over the frames).

    python -m bench.prepare [--sizes 2048x2448 1080x1920 512x512] [--input 256x256]
        -> bench/results/prepare-grey.json
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from bench.accuracy import RESULTS
from calibration.artifact import machine_info
from calibration.geometry import Geometer, Geometry, InputSpec
from calibration.images import to_rgb
from pipeline.cli import _input_size  # "S" or "HxW", as fit's --input-size takes it


def _median_ms(fn, frames: list[np.ndarray]) -> float:
    passes = []
    for _ in range(5):
        start = time.perf_counter()
        for frame in frames:
            fn(frame)
        passes.append(1000 * (time.perf_counter() - start) / len(frames))
    return float(np.median(passes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=_input_size, default=[(2048, 2448), (1080, 1920), (512, 512)])
    parser.add_argument("--input", type=_input_size, default=(256, 256))
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    geometer = Geometer(InputSpec(*args.input), Geometry(), stride=8)
    out = np.empty((1, *args.input, 3), np.uint8)
    rng = np.random.default_rng(0)
    rows = {}
    for size in args.sizes:
        frames = [cv2.GaussianBlur(rng.integers(0, 256, size, dtype=np.uint8), (0, 0), 2) for _ in range(args.frames)]
        layout = geometer.layout(size)
        inputs = {}

        def widened_first(frame):
            geometer.prepare(to_rgb(frame), layout, out)
            inputs["widened"] = out.copy()

        def resized_first(frame):
            geometer.prepare(to_rgb(frame, keep_grey=True), layout, out)
            inputs["resized"] = out.copy()

        before, after = _median_ms(widened_first, frames), _median_ms(resized_first, frames)
        same = bool(np.array_equal(inputs["widened"], inputs["resized"]))
        rows[f"{size[0]}x{size[1]}"] = {"widened_first_ms": before, "resized_first_ms": after,
                                        "ratio": after / before, "same_input": same}
        print(f"{size[1]}x{size[0]} Mono8: {before:.2f} ms widened first, {after:.2f} ms resized first "
              f"({after / before:.2f}x), same input: {same}", flush=True)
    result = {"input": list(args.input), "frames": args.frames, "threads": 1, "rows": rows,
              "method": "median of 5 passes; to_rgb + Geometer.prepare (photometric standardisation included)",
              "machine": machine_info()}
    (RESULTS / "prepare-grey.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
