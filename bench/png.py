"""Encoder settings for what lineguard writes at line rate: the 8-bit defect maps (frame size, the
sink) and the overlays (canvas size, the postprocess worker), made from a fitted model's real maps of
a dataset's defective test images. Encode milliseconds (best of 5 passes) and bytes per image.

    python -m bench.png MODEL DATA [--images 32]      -> bench/results/png.json

rows: lossless PNG encoders: OpenCV's settings (maps and overlays) and lineguard's own `png_gray`
(greyscale maps only), which writes the maps (they are data: they stay lossless). overlay_jpeg: JPEG
qualities for the overlays, which are pictures for people, with their PSNR against the overlay itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from bench.accuracy import RESULTS
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, read_image
from calibration.images import OVERLAY_JPEG, png_gray
from calibration.maps import defect_map, normalise, overlay, smooth
from calibration.model import Inspector, Model
from engines.runtimes import Deployment

C = cv2
SETTINGS = {  # OpenCV's PNG encoder (libpng and zlib)
    "level 1, adaptive filters": [C.IMWRITE_PNG_COMPRESSION, 1],
    "level 3 (OpenCV default)": [C.IMWRITE_PNG_COMPRESSION, 3],
    "level 1, huffman only": [C.IMWRITE_PNG_COMPRESSION, 1, C.IMWRITE_PNG_STRATEGY, C.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY],
    "level 1, filter up": [C.IMWRITE_PNG_COMPRESSION, 1, C.IMWRITE_PNG_FILTER, C.IMWRITE_PNG_FILTER_UP],
    "level 1, filter sub, rle": [C.IMWRITE_PNG_COMPRESSION, 1, C.IMWRITE_PNG_STRATEGY, C.IMWRITE_PNG_STRATEGY_RLE,
                                 C.IMWRITE_PNG_FILTER, C.IMWRITE_PNG_FILTER_SUB],
    "level 1, filter up, rle (maps before png_gray)": [C.IMWRITE_PNG_COMPRESSION, 1, C.IMWRITE_PNG_STRATEGY,
                                                      C.IMWRITE_PNG_STRATEGY_RLE, C.IMWRITE_PNG_FILTER,
                                                      C.IMWRITE_PNG_FILTER_UP],
    "level 0 (stored)": [C.IMWRITE_PNG_COMPRESSION, 0],
}
ENCODERS = {name: (lambda a, p=params: cv2.imencode(".png", a, p)[1].tobytes()) for name, params in SETTINGS.items()}
ENCODERS["png_gray: filter up, ISA-L level 1"] = png_gray  # greyscale only: the maps
IN_USE = "png_gray: filter up, ISA-L level 1"


def images(model_dir: Path, data: Path, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The frame-size uint8 defect maps and canvas-size overlays of up to n defective test images."""
    model = Model(model_dir)
    frames = [read_image(s.path) for s in evaluation_samples(data) if s.label == 1][:n]
    maps, overlays = [], []
    with Inspector(model, Deployment(threads=1), 8) as inspector:
        for start in range(0, len(frames), 8):
            for frame, r in zip(frames[start:start + 8], inspector.inspect(frames[start:start + 8])):
                heat = normalise(smooth(r.canvas_map, model.maps), model.thresholds["pixel"])
                maps.append(defect_map(heat, frame.shape[:2]))
                overlays.append(overlay(np.ascontiguousarray(model.geometer.canvas_image(frame, r.layout)), heat))
    return maps, overlays


def encode(arrays: list[np.ndarray], encoder) -> tuple[float, list[bytes]]:
    """Best of 5 passes: (seconds a pass, the encoded files)."""
    best, encoded = float("inf"), []
    for _ in range(5):
        start = time.perf_counter()
        encoded = [encoder(a) for a in arrays]
        best = min(best, time.perf_counter() - start)
    return best, encoded


def measure(arrays: list[np.ndarray], encoder) -> dict | None:
    if arrays[0].ndim == 3 and encoder is png_gray:
        return None
    best, encoded = encode(arrays, encoder)
    for a, e in zip(arrays[:4], encoded):  # lossless, whatever the encoder
        assert np.array_equal(cv2.imdecode(np.frombuffer(e, np.uint8), cv2.IMREAD_UNCHANGED), a)
    return {"ms": round(1000 * best / len(arrays), 3), "kb": round(sum(map(len, encoded)) / len(arrays) / 1024, 1)}


def measure_jpeg(arrays: list[np.ndarray], quality: int) -> dict:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    best, encoded = encode(arrays, lambda a: cv2.imencode(".jpg", a, params)[1].tobytes())
    psnr = [cv2.PSNR(a, cv2.imdecode(np.frombuffer(e, np.uint8), cv2.IMREAD_COLOR)) for a, e in zip(arrays, encoded)]
    return {"quality": quality, "in_use": params == OVERLAY_JPEG, "ms": round(1000 * best / len(arrays), 3),
            "kb": round(sum(map(len, encoded)) / len(arrays) / 1024, 1), "psnr_db": round(float(np.mean(psnr)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "png.json")
    args = parser.parse_args()
    maps, overlays = images(args.model, args.data, args.images)
    rows = [{"setting": name, "in_use": name == IN_USE, "map": measure(maps, encoder),
             "overlay": measure(overlays, encoder)} for name, encoder in ENCODERS.items()]
    jpeg = [measure_jpeg(overlays, q) for q in (80, 90, 95)]
    for r in rows:
        overlay_cell = f"overlay {r['overlay']['ms']:6.2f} ms {r['overlay']['kb']:6.1f} KB" if r["overlay"] else ""
        print(f"{r['setting']:<46} map {r['map']['ms']:6.2f} ms {r['map']['kb']:6.1f} KB   {overlay_cell}"
              f"{'  (maps)' if r['in_use'] else ''}")
    for r in jpeg:
        print(f"overlay JPEG quality {r['quality']:<7} {r['ms']:6.2f} ms {r['kb']:6.1f} KB  PSNR {r['psnr_db']} dB"
              f"{'  (overlays)' if r['in_use'] else ''}")
    result = {"data": str(args.data), "images": len(maps), "map_shape": list(maps[0].shape),
              "overlay_shape": list(overlays[0].shape), "rows": rows, "overlay_jpeg": jpeg, "machine": machine_info()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
