"""`lineguard bench`: in one run, on the same synthetic frames and batch size,

(a) the bare compute: engine + bank on pre-batched arrays in this process;
(b) the whole pipeline over ipc, producer, workers and sink as separate processes;
efficiency = fps(b) / fps(a); and (c) the transport alone: 1920x1080 RGB frames through the
wire layer vs raw pyzmq, both over ipc between two processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import zmq

from pipeline import wire


def bare_compute(model_dir: Path, frames: np.ndarray, batch: int, deployment) -> dict:
    """frames uint8 [N, H, W, 3] model inputs: fps of the detector (engine and, for a memory bank, its
    search) with the image scores, in this process, on pre-batched arrays."""
    from calibration.maps import image_score
    from calibration.model import Model

    model = Model(model_dir)
    detector = model.detector(deployment)
    with detector:
        detector.maps(frames[:batch])  # warm up
        start = time.perf_counter()
        for i in range(0, len(frames), batch):
            for m in detector.maps(frames[i:i + batch]):
                image_score(m, model.maps)
        seconds = time.perf_counter() - start
    n = len(frames)
    return {"fps": n / seconds, "batch": batch, "frames": n, "ms_per_frame": 1000 * seconds / n, "kind": model.kind.name}


def _send_frames(endpoint: str, count: int, use_wire: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 16)
    sock.connect(endpoint)
    image = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    raw = memoryview(image).cast("B")
    for seq in range(count):
        if use_wire:
            sock.send_multipart(wire.encode_frame("bench", seq, image), copy=False)
        else:
            sock.send(raw, copy=False)
    sock.close(linger=-1)
    ctx.term()


def _receive(endpoint: str, count: int, use_wire: bool) -> tuple[float, float]:
    """(frames per second, CPU ms per frame of both processes, ZeroMQ I/O threads included)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = time.process_time()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 16)
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    sock.bind(endpoint)
    sender = multiprocessing.get_context("spawn").Process(target=_send_frames, args=(endpoint, count, use_wire))
    sender.start()
    try:
        sock.recv_multipart(copy=False)  # the first frame starts the clock
        start = time.perf_counter()
        for _ in range(count - 1):
            if use_wire:
                image = wire.decode(sock.recv_multipart(copy=False)).image()
                assert image.shape == (1080, 1920, 3)
            else:
                frame = sock.recv(copy=False)
                image = np.frombuffer(frame.buffer, np.uint8).reshape(1080, 1920, 3)
        elapsed = time.perf_counter() - start
    finally:
        sender.join()
        sock.close(linger=0)
        ctx.term()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (time.process_time() - own) + (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
    return (count - 1) / elapsed, 1000 * cpu / count


def transport(count: int = 300) -> dict:
    """Frames per second of 1920x1080 RGB over ipc: raw pyzmq (one buffer) vs wire encode/decode."""
    from pipeline.run import ipc_folder

    results = {"raw": [], "wire": []}
    cpu = {"raw": [], "wire": []}
    pairs = 10
    tmp = ipc_folder()
    try:
        _receive(f"ipc://{tmp}/warmup", count, False)  # first runs pay for page faults and imports
        for i in range(pairs):  # adjacent pairs, alternating which goes first: this machine's speed drifts
            for use_wire in ((False, True) if i % 2 == 0 else (True, False)):
                name = "wire" if use_wire else "raw"
                fps, ms = _receive(f"ipc://{tmp}/t{i}{name}", count, use_wire)
                results[name].append(fps)
                cpu[name].append(ms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [w / r for w, r in zip(results["wire"], results["raw"])]
    cpu_raw, cpu_wire = float(np.median(cpu["raw"])), float(np.median(cpu["wire"]))
    return {"frames": count, "shape": [1080, 1920, 3], "raw_fps": float(np.median(results["raw"])),
            "wire_fps": float(np.median(results["wire"])), "ratio": float(np.median(ratios)), "pair_ratios": ratios,
            "cpu_ms_per_frame": {"raw": cpu_raw, "wire": cpu_wire}, "cpu_ratio": cpu_raw / cpu_wire,
            "runs": results, "cpu_runs": cpu,
            "method": f"median of {pairs} adjacent raw / wire pair ratios after a warm-up run; cpu_ratio: raw / wire "
                      "CPU time per frame of sender and receiver, ZeroMQ I/O threads included (less noisy here)"}


def benchmark(model_dir: Path, deployment, frames: int = 500, batch: int = 8, transport_frames: int = 300) -> dict:
    """Run (a), (b) and (c); returns a JSON-able dict with the machine and versions."""
    from calibration.artifact import load_manifest, machine_info
    from pipeline.producers import SyntheticSource
    from pipeline.run import RunConfig, run_pipeline

    from calibration.images import resize

    spec = load_manifest(model_dir)["input"]
    size = spec["height"]
    source = SyntheticSource(frames, size=size)
    pool = np.stack([resize(image, spec["height"], spec["width"]) for image, _ in source.pool])
    arrays = pool[np.arange(frames) % len(pool)]
    compute = bare_compute(model_dir, arrays, batch, deployment)
    pipeline = run_pipeline(RunConfig(model=Path(model_dir), source="synthetic", frames=frames, batch=batch,
                                      deployment=deployment))
    return {"compute": compute, "pipeline": pipeline, "efficiency": pipeline["fps"] / compute["fps"],
            "transport": transport(transport_frames), "machine": machine_info(),
            "config": {"model": str(model_dir), "frames": frames, "batch": batch, "input": [spec["height"], spec["width"]],
                       "deployment": dataclasses.asdict(deployment)}}
