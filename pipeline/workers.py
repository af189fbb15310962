"""Inference workers (dynamic batching through the engine and the bank) and postprocess workers.

    producer --frames--> inference worker(s) --scored--> postprocess worker(s) --results--> sink

Each worker owns its zmq Context and sockets (created in the process that uses them), keeps
serving through malformed messages (counted; answered with an error result when the header
names its stream and seq), and stops on SIGTERM / SIGINT or a `stop` event.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from calibration.dataset import resize_to_input
from pipeline import wire


@dataclasses.dataclass
class WorkerStats:
    frames: int = 0
    batches: int = 0
    errors: int = 0
    rejected: dict = dataclasses.field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def stop_on_signals(stop: threading.Event) -> None:
    """Set `stop` on SIGTERM / SIGINT (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())


class Control:
    """Optional PUSH to a supervisor's control endpoint: ready and stats messages."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None, role: str, name: str):
        self.sock = None
        self.role, self.name = role, name
        if endpoint:
            self.sock = ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.connect(endpoint)

    def send(self, kind: str, **fields) -> None:
        if self.sock is not None:
            self.sock.send_multipart(wire.encode_control(kind, self.role, self.name, fields))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _shut(ctx: zmq.Context, ctl: Control, stats: WorkerStats, inp: zmq.Socket, out: zmq.Socket) -> None:
    """A worker's last stats to the supervisor, then its sockets: unread input dropped, results flushed."""
    ctl.send("stats", **dataclasses.asdict(stats))
    ctl.close()
    inp.close(linger=0)
    out.close()
    ctx.term()


def _error_result(stream: str, seq: int, t_ns: int, message: str, meta: dict | None = None) -> list:
    return wire.encode_result(wire.Result(stream, seq, t_ns, "error", error=message, meta=meta or {}))


def inference_worker(model_dir: str | Path, frames_endpoint: str, out_endpoints: list[str], *,
                     deployment=None, batch: int = 8, batch_ms: float = 10.0,
                     hwm: int = 4, control: str | None = None, name: str = "infer0",
                     stop: threading.Event | None = None) -> WorkerStats:
    """PULL frames (connect), batch up to `batch` frames or `batch_ms` after the first, score, PUSH on (connect).

    Each frame is decoded and resized once, into a reused uint8 [batch, S, S, 3] buffer.
    """
    from calibration.model import Deployment, InspectionModel  # torch and onnxruntime load only here

    stop = stop or threading.Event()
    stop_on_signals(stop)
    model = InspectionModel(model_dir, deployment or Deployment())
    size = model.input_size
    buffer = np.empty((batch, size, size, 3), np.uint8)
    stats = WorkerStats()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, hwm)
    inp.connect(frames_endpoint)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 4 * batch)
    out.setsockopt(zmq.LINGER, 5000)
    for endpoint in out_endpoints:
        out.connect(endpoint)
    ctl = Control(ctx, control, "infer", name)
    try:
        with model:
            model.score(buffer[:1])  # warm up before announcing readiness
            ctl.send("ready")
            while not stop.is_set():
                messages = _collect(inp, batch, batch_ms, stop)
                if messages:
                    _score_batch(model, messages, buffer, out, stats)
                    ctl.send("stats", **dataclasses.asdict(stats))
    finally:
        _shut(ctx, ctl, stats, inp, out)
    return stats


def _collect(sock: zmq.Socket, batch: int, batch_ms: float, stop: threading.Event) -> list:
    """Up to `batch` messages: wait for the first (waking every 100 ms to check stop), then at most batch_ms more."""
    while not stop.is_set():
        if sock.poll(100):
            break
    else:
        return []
    messages = [sock.recv_multipart(copy=False)]
    deadline = time.perf_counter() + batch_ms / 1000
    while len(messages) < batch:
        try:
            messages.append(sock.recv_multipart(copy=False, flags=zmq.NOBLOCK))
            continue
        except zmq.Again:
            pass
        left = deadline - time.perf_counter()
        if left <= 0 or not sock.poll(max(1, int(left * 1000))):
            break
    return messages


def _score_batch(model, messages: list, buffer: np.ndarray, out: zmq.Socket, stats: WorkerStats) -> None:
    t_recv = time.time_ns()
    start = time.perf_counter()
    frames = []
    for message in messages:
        try:
            frame = wire.decode(message)
            if not isinstance(frame, wire.Frame):
                raise wire.WireError("bad_kind", f"inference worker expects frames, got a {frame.kind} message")
            if "error" in frame.meta:  # the source could not read it; account for it as an error
                out.send_multipart(_error_result(frame.stream, frame.seq, frame.t_ns, str(frame.meta["error"]),
                                                 frame.meta))
                stats.errors += 1
                continue
            image = frame.image()
            if image.dtype != np.uint8:
                image = (image >> 8).astype(np.uint8)
            if image.shape[2] == 1:
                image = np.repeat(image, 3, axis=2)
            elif image.shape[2] == 4:
                image = image[:, :, :3]
            buffer[len(frames)] = resize_to_input(image, buffer.shape[1])
            frames.append(frame)
        except wire.WireError as exc:
            stats.reject(exc.reason)
            if exc.stream is not None and exc.seq is not None:
                out.send_multipart(_error_result(exc.stream, exc.seq, exc.t_ns or t_recv, f"rejected: {exc}"))
                stats.errors += 1
    if not frames:
        return
    t_pre = time.perf_counter()
    patch, scores = model.score(buffer[:len(frames)])
    t_done = time.perf_counter()
    n = len(frames)
    timing = {"preprocess": 1000 * (t_pre - start) / n, "infer": 1000 * (t_done - t_pre) / n, "batch": float(n)}
    for k, frame in enumerate(frames):
        queued = max(0.0, (t_recv - frame.t_ns) / 1e6)
        # the batch buffer is reused for the next batch: the model input travels as a copy
        out.send_multipart(wire.encode_scored(frame, float(scores[k]), patch[k], buffer[k].copy(),
                                              {"queue": queued, **timing}), copy=False)
    stats.frames += n
    stats.batches += 1


def postprocess_worker(model_dir: str | Path, in_endpoint: str, sink_endpoint: str, *, overlays: Path | None = None,
                       attach_maps: bool = True, hwm: int = 32, control: str | None = None, name: str = "post0",
                       stop: threading.Event | None = None) -> WorkerStats:
    """PULL scored frames (bound at in_endpoint), emit results to the sink (PUSH, connect).

    Smooths the patch map (model input size), normalises it with the model's pixel threshold: the
    frame is defective when its maximum reaches 0.5. For defective frames the map is resized to
    the frame's original size, regions are extracted, the 8-bit defect map (normalised score x 255)
    is attached and an overlay PNG is written into `overlays` when given.
    """
    from calibration.artifact import load_manifest
    from calibration.maps import defect_regions, normalise, overlay, smooth_map, to_original_size

    stop = stop or threading.Event()
    stop_on_signals(stop)
    manifest = load_manifest(model_dir)
    thresholds = json.loads((Path(model_dir) / "thresholds.json").read_text())
    size = manifest["embedding"]["input_size"]
    sigma = manifest["scoring"]["blur_sigma"]
    stats = WorkerStats()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, hwm)
    inp.bind(in_endpoint)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    out.connect(sink_endpoint)
    ctl = Control(ctx, control, "post", name)
    ctl.send("ready")
    last_stats = time.monotonic()
    try:
        while not stop.is_set():
            if not inp.poll(100):
                continue
            message = inp.recv_multipart(copy=False)
            start = time.perf_counter()
            try:
                item = wire.decode(message)
            except wire.WireError as exc:
                stats.reject(exc.reason)
                if exc.stream is not None and exc.seq is not None:
                    out.send_multipart(_error_result(exc.stream, exc.seq, exc.t_ns or time.time_ns(), f"rejected: {exc}"))
                continue
            if isinstance(item, wire.Result):  # an error result from an inference worker: pass it on
                out.send_multipart(wire.encode_result(item), copy=False)
                stats.errors += 1
                continue
            if not isinstance(item, wire.Scored):
                stats.reject("bad_kind")
                continue
            # the verdict and the regions come from the same smoothed map and pixel threshold, so a
            # defective frame always has a region and an ok frame never has one
            # (at the frame's own size: shrinking can lower the peak; growing cannot raise it, so
            # large ok frames are decided at the input size and never resized)
            h, w = item.shape[:2]
            small = normalise(smooth_map(item.patch_map, size, sigma), thresholds["pixel"])
            heat = small
            if h < size or w < size or heat.max() >= 0.5:
                heat = to_original_size(small, (h, w))
            image_score = float(heat.max())
            defect = image_score >= 0.5
            regions, defect_map = [], None
            if defect:
                regions = [wire.Region(b, a, p) for b, a, p in defect_regions(heat)]
                defect_map = (heat * 255).astype(np.uint8) if attach_maps else None
                if overlays is not None:  # drawn at the model's input size: line rate, not print quality
                    overlays.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(overlays / f"{item.stream}-{item.seq:08d}.png"),
                                overlay(np.ascontiguousarray(item.image), small, small >= 0.5))
            timing = dict(item.timing)
            timing["post"] = 1000 * (time.perf_counter() - start)
            result = wire.Result(item.stream, item.seq, item.t_ns, "defect" if defect else "ok", image_score,
                                 tuple(regions), timing, None, defect_map, item.meta)
            out.send_multipart(wire.encode_result(result), copy=False)
            stats.frames += 1
            if time.monotonic() - last_stats > 0.5:
                ctl.send("stats", **dataclasses.asdict(stats))
                last_stats = time.monotonic()
    finally:
        _shut(ctx, ctl, stats, inp, out)
    return stats
