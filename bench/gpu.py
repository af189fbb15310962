"""The GPU path on an NVIDIA GPU: bare compute and the whole pipeline, per runtime and precision.

    python -m bench.gpu MODEL [--frames 512]

For torch on CUDA (fp32, fp16 with CUDA graphs) and TensorRT (fp32, fp16, int8; when tensorrt
and pycuda are installed): images/s and per-batch latency p50 / p99 at batch 1, 8 and 32 of
(a) the engine alone, (b) the whole device path (uint8 upload, network, exact bank search,
map smoothing, scores back; torch only), and (c) `lineguard run` with synthetic frames. Writes
bench/results/<gpu-name>.json with the machine and versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from calibration.artifact import load_manifest, machine_info
from calibration.model import Deployment, InspectionModel
from pipeline.producers import SyntheticSource
from pipeline.run import RunConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32)


def timed(fn, images: np.ndarray, batch: int, repeats: int) -> dict:
    fn(images[:batch])
    torch.cuda.synchronize()
    latencies = []
    for _ in range(repeats):
        for i in range(0, len(images) - batch + 1, batch):
            start = time.perf_counter()
            fn(images[i:i + batch])
            torch.cuda.synchronize()
            latencies.append(1000 * (time.perf_counter() - start))
    lat = np.array(latencies)
    return {"batch": batch, "images_per_s": 1000 * batch / lat.mean(), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p99": float(np.percentile(lat, 99))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs an NVIDIA GPU with CUDA")
    size = load_manifest(args.model)["embedding"]["input_size"]
    pool = np.stack([image for image, _ in SyntheticSource(64, size=size).pool])
    images = pool[np.arange(args.frames) % len(pool)]
    deployments = [Deployment("torch", "fp32", "cuda"), Deployment("torch", "fp16", "cuda", cuda_graphs=True)]
    if all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda")):
        deployments += [Deployment("tensorrt", p, "cuda") for p in ("fp32", "fp16", "int8")]
    rows = []
    for d in deployments:
        with InspectionModel(args.model, d) as model:
            for batch in BATCHES:
                row = {"runtime": d.runtime, "precision": d.precision, "cuda_graphs": d.cuda_graphs}
                row["engine"] = timed(model.engine.infer, images, batch, args.repeats)
                if d.runtime == "torch":
                    row["device_path"] = timed(lambda x: model.score_on_device(x), images, batch, args.repeats)
                rows.append(row)
                print(json.dumps(row), flush=True)
        for batch in (8, 32):
            summary = run_pipeline(RunConfig(model=args.model, frames=args.frames, batch=batch, deployment=d))
            rows.append({"runtime": d.runtime, "precision": d.precision, "pipeline_batch": batch,
                         "pipeline": {k: summary[k] for k in ("fps", "latency_ms", "results", "error")}})
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0).replace(" ", "_")
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows, "machine": machine_info(),
                               "torch_cuda": torch.version.cuda, "frames": args.frames}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
