"""Where one inference worker's time goes, a memory-bank model on one thread (as `run` deploys each
worker): fitting on a dataset, then per frame of its test images, the preparation (resize,
photometric standardisation), the network, the bank search, the exact re-ranking of each map's
highest cells, and the image score. Steps are timed apart, in rounds (this machine's speed drifts),
and the median of the rounds is recorded.

    python -m bench.worker_profile --dataset magnetic_tile/tile [--precision int8] [-- FIT OPTIONS]

Writes bench/results/worker-profile-<dataset>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.accuracy import DATA, RESULTS
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, read_frames
from calibration.memory_bank import distance_maps
from calibration.model import Inspector, Model, image_score
from engines.runtimes import Deployment
from pipeline.cli import main as lineguard

STEPS = ("prepare", "network", "search", "rerank", "score")


def profile(model: Model, images: list[tuple], precision: str, batch: int) -> dict[str, float]:
    """ms per frame of each step, one pass over `images` ((layout, pixels) each, `read_frames`) in batches."""
    spent = dict.fromkeys(STEPS, 0.0)
    with Inspector(model, Deployment(precision=precision, threads=1), batch) as inspector:
        detector, buffer = inspector.detector, inspector.buffer
        for start in range(0, len(images), batch):
            layouts, frames = zip(*images[start:start + batch])
            t0 = time.perf_counter()
            for k, (frame, layout) in enumerate(zip(frames, layouts)):
                model.geometer.prepare(frame, layout, buffer[k:k + 1])
            t1 = time.perf_counter()
            features = detector.engine.infer(buffer[:len(frames)])
            t2 = time.perf_counter()
            detector.bank.search(features.reshape(-1, features.shape[-1]), 1)
            t3 = time.perf_counter()
            maps = distance_maps(detector.bank, features)  # the search again, then the re-ranking
            t4 = time.perf_counter()
            for k, layout in enumerate(layouts):
                image_score(model.canvas_map(maps[k:k + 1], layout), model.maps)
            t5 = time.perf_counter()
            for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) - (t3 - t2), t5 - t4)):
                spent[step] += seconds
    return {step: 1000 * seconds / len(images) for step, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--images", type=int, default=64, help="test images, evenly spread")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="")
    parser.add_argument("fit_args", nargs="*")
    args = parser.parse_args()
    data = DATA / args.dataset
    paths = [s.path for s in evaluation_samples(data)]
    paths = paths[::max(1, len(paths) // args.images)][:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        if lineguard(["fit", str(data), "-o", str(model_dir), *args.fit_args]):
            raise SystemExit(f"fit failed on {args.dataset}")
        if args.precision == "int8" and lineguard(["export", str(model_dir), "--precision", "int8"]):
            raise SystemExit(f"int8 export refused on {args.dataset}")
        model = Model(model_dir)
        if model.kind.name != "memory_bank":
            raise SystemExit("bench.worker_profile times a memory-bank model's steps")
        images = list(read_frames(paths, model.geometer))  # decoded as the workers decode them
        profile(model, images[:args.batch_size], args.precision, args.batch_size)  # warm up
        rounds = [profile(model, images, args.precision, args.batch_size) for _ in range(args.rounds)]
        bank = model.manifest["memory_bank"]
    median = {step: float(np.median([r[step] for r in rounds])) for step in STEPS}
    total = sum(median.values())
    result = {"dataset": args.dataset, "images": len(images), "precision": args.precision, "threads": 1,
              "batch": args.batch_size, "fit_args": args.fit_args, "bank": bank["bank"], "input": model.manifest["input"],
              "ms_per_frame": median, "share": {step: ms / total for step, ms in median.items()}, "rounds": rounds,
              "machine": machine_info()}
    print(" ".join(f"{step} {ms:.2f}" for step, ms in median.items()), f"ms per frame ({args.precision}, one thread)")
    name = args.dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"worker-profile-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
