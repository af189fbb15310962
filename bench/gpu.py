"""The GPU path on an NVIDIA GPU: bare compute, the whole device path and the pipeline, per runtime
and precision, for any kind of model.

    python -m bench.gpu MODEL [--frames 512]
    python -m bench.gpu MODEL --device cpu --frames 32     # a dry run of the same code on the CPU

For torch on CUDA (fp32; fp16 with CUDA graphs) and TensorRT (fp32, fp16, int8; when tensorrt and
pycuda are installed): images/s and per-batch latency p50 / p99 at batch 1, 8 and 32 of (a) the
detector alone (network and, for a memory bank, its search), (b) the whole device path of
`Inspector` (page-locked uint8 upload, network, search, image scores, verdicts, smoothing of the
defective frames' maps, 8-bit maps back), and (c) `lineguard run` with synthetic frames. Writes
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

from calibration.artifact import machine_info
from calibration.images import resize
from calibration.model import Inspector, Model
from engines.runtimes import Deployment
from pipeline.producers import SyntheticSource
from pipeline.run import RunConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed(fn, items: list, batch: int, repeats: int, device: str) -> dict:
    fn(items[:batch])
    _sync(device)
    latencies = []
    for _ in range(repeats):
        for i in range(0, len(items) - batch + 1, batch):
            start = time.perf_counter()
            fn(items[i:i + batch])
            _sync(device)
            latencies.append(1000 * (time.perf_counter() - start))
    lat = np.array(latencies)
    return {"batch": batch, "images_per_s": 1000 * batch / lat.mean(), "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p99": float(np.percentile(lat, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    parser.add_argument("--out", type=Path, default=None, help="result file (default bench/results/<gpu>.json)")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs an NVIDIA GPU with CUDA (or --device cpu for a dry run)")
    model = Model(args.model)
    h, w = model.spec.height, model.spec.width
    pool = [resize(image, h, w) for image, _ in SyntheticSource(64, size=max(h, w)).pool]
    frames = [pool[i % len(pool)] for i in range(args.frames)]
    inputs = np.stack(frames)
    deployments = [Deployment("torch", "fp32", args.device)]
    if args.device != "cpu":
        deployments.append(Deployment("torch", "fp16", args.device, cuda_graphs=True))
        if all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda")):
            deployments += [Deployment("tensorrt", p, args.device) for p in ("fp32", "fp16", "int8")]
    rows = []
    for d in deployments:
        with Inspector(model, d, batch=max(BATCHES), device_path=True) as inspector:
            for batch in BATCHES:
                row = {"runtime": d.runtime, "precision": d.precision, "cuda_graphs": d.cuda_graphs, "batch": batch}
                row["detector"] = timed(lambda x: inspector.detector.maps_device(np.stack(x)), list(inputs), batch,
                                        args.repeats, args.device)
                row["device_path"] = timed(inspector.inspect, frames, batch, args.repeats, args.device)
                rows.append(row)
                print(json.dumps(row), flush=True)
        for batch in (8, 32):
            summary = run_pipeline(RunConfig(model=args.model, frames=args.frames, batch=batch, deployment=d))
            rows.append({"runtime": d.runtime, "precision": d.precision, "pipeline_batch": batch,
                         "pipeline": {k: summary[k] for k in ("fps", "latency_ms", "results", "error", "lost")}})
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(0).replace(" ", "_") if args.device != "cpu" else "cpu-dry-run"
    out = args.out or ROOT / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps({"gpu": name, "kind": model.kind.name, "input": [h, w], "rows": rows,
                               "machine": machine_info(), "torch_cuda": torch.version.cuda,
                               "frames": args.frames}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
