"""What a worker pays to turn a large JPEG frame into a model input: decoding it whole and resizing it (area
filter) against decoding it at 1/2, 1/4 or 1/8 of its size (libjpeg's scaled inverse DCT) and resizing
that, one thread, milliseconds per frame (median of 5 passes), and the mean absolute difference of the
inputs each way against the whole decode's (grey levels).

Frames: a dataset's test images enlarged (bicubic) to --size and saved as baseline JPEG quality 95,
as a multi-megapixel camera saves them.

    python -m bench.jpeg [--dataset mvtec_subset/hazelnut] [--size 2048x2448] [--input 256x256]
        -> bench/results/jpeg-decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np

from bench.accuracy import DATA, RESULTS
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, read_image
from calibration.images import decode, resize, shrunk
from pipeline.cli import _input_size  # "S" or "HxW", as fit's --input-size takes it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mvtec_subset/hazelnut")
    parser.add_argument("--size", type=_input_size, default=(2048, 2448), help="HxW the frames are enlarged to")
    parser.add_argument("--input", type=_input_size, default=(256, 256), help="HxW of the model input they are resized to")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    (h, w), (ih, iw) = args.size, args.input
    files = []
    for sample in evaluation_samples(DATA / args.dataset)[:args.images]:
        big = cv2.resize(read_image(sample.path)[:, :, ::-1], (w, h), interpolation=cv2.INTER_CUBIC)
        files.append(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    reference = [resize(decode(f), ih, iw) for f in files]
    rows = {}
    for shrink in (1, 2, 4, 8):
        sh, sw = shrunk((h, w), shrink)
        if sh < ih or sw < iw:
            continue  # decoded smaller than the input: not a way lineguard takes
        passes, inputs = [], []
        for _ in range(5):
            start = time.perf_counter()
            inputs = [resize(decode(f, shrink=shrink), ih, iw) for f in files]
            passes.append(1000 * (time.perf_counter() - start) / len(files))
        decoded = decode(files[0], shrink=shrink).shape[:2]
        start = time.perf_counter()
        for _ in range(5):
            for f in files:
                decode(f, shrink=shrink)
        decode_ms = 1000 * (time.perf_counter() - start) / (5 * len(files))
        diff = float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(inputs, reference)]))
        rows[f"1/{shrink}"] = {"decoded": list(decoded), "ms_per_frame": float(np.median(passes)),
                               "decode_ms": decode_ms, "mean_abs_diff_to_whole": diff}
        print(f"1/{shrink}: decoded {decoded[1]}x{decoded[0]}, {np.median(passes):.2f} ms a frame "
              f"to the input ({decode_ms:.2f} decoding), mean |diff| {diff:.3f} grey levels", flush=True)
    result = {"dataset": args.dataset, "frame": [h, w], "input": [ih, iw], "images": len(files), "threads": 1,
              "rows": rows, "method": "median of 5 passes over the frames, decode + resize (area filter)",
              "machine": machine_info()}
    (RESULTS / "jpeg-decode.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
