"""Inference workers (dynamic batching through the engine and the bank) and postprocess workers.

    producer --frames--> inference worker(s) --scored--> postprocess worker(s) --results--> sink

Each worker owns its zmq Context and sockets (created in the process that uses them), keeps
serving through malformed messages (counted; answered with an error result when the header
names its stream and seq), and stops on SIGTERM / SIGINT or a `stop` event.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import zmq

from pipeline import wire
from pipeline.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, NoMetrics, stage_metrics

WARM_BATCHES = 2  # full batches an inference worker runs before it announces readiness


@dataclasses.dataclass
class WorkerStats:
    """A worker's counters (sent to the supervisor as they are) and its Prometheus metrics."""

    frames: int = 0
    batches: int = 0
    errors: int = 0
    rejected: dict = dataclasses.field(default_factory=dict)
    metrics: object = dataclasses.field(default_factory=NoMetrics, repr=False, compare=False)

    def counts(self) -> dict:
        return {"frames": self.frames, "batches": self.batches, "errors": self.errors, "rejected": dict(self.rejected)}

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.metrics.count("rejected", "messages rejected, by reason", n, reason=reason)

    def error(self) -> None:
        self.errors += 1
        self.metrics.count("errors", "frames answered with an error result")


def send(sock: zmq.Socket, message: list, stop: threading.Event, idle=None) -> bool:
    """Send one message, waiting on backpressure (calling `idle` while it waits) but never past `stop`:
    False if stopped first. A plain blocking send to a receiver that is gone (a full pipe, a PUSH with no
    peer) would never return, and a SIGTERM only sets `stop`."""
    while not stop.is_set():
        try:
            sock.send_multipart(message, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            sock.poll(100, zmq.POLLOUT)
            if idle is not None:
                idle()
    return False


class SignalActions:
    """Runs what signal handlers ask for, one at a time. Python runs a handler between any two bytecodes
    of the main thread, inside another handler too: a signal arriving while a handler is inside
    `Event.set` (holding the event's lock) made the next `set` wait on that lock forever, and signals
    come in bursts (a worker of a killed supervisor was seen handling three SIGTERMs nested). An action
    asked for while one runs is queued for it."""

    def __init__(self):
        self.pending: collections.deque = collections.deque()
        self.running = False

    def __call__(self, action: Callable[[], object]) -> None:
        self.pending.append(action)
        while not self.running and self.pending:  # (a handler that came in just as the last one ended)
            self.running = True
            try:
                while self.pending:
                    self.pending[0]()
                    self.pending.popleft()
            finally:
                self.running = False


SIGNAL_ACTIONS = SignalActions()  # the process's one: handlers run in the main thread only


def stop_on_signals(stop: threading.Event, end: threading.Event | None = None) -> None:
    """Set `stop` on SIGTERM / SIGINT (main thread only). With `end`: the first SIGINT sets `end` (finish
    what was accepted, take nothing new), a second one `stop`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: SIGNAL_ACTIONS(stop.set))
        signal.signal(signal.SIGINT, lambda *_: SIGNAL_ACTIONS((stop if end is None or end.is_set() else end).set))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # `lineguard run` starts its stages with it blocked


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
        """Never waits: a supervisor that stopped reading (or died) misses a message, whose counts the next
        stats message carries again."""
        if self.sock is not None:
            try:
                self.sock.send_multipart(wire.encode_control(kind, self.role, self.name, fields), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def _shut(ctx: zmq.Context, ctl: Control, stats: WorkerStats, inp: zmq.Socket, out: zmq.Socket, curve=None) -> None:
    """A worker's last stats to the supervisor, then its sockets: unread input dropped, results flushed."""
    if curve is not None:
        for reason, n in curve.refusals.counts.items():
            stats.reject(reason, n)
        curve.close()
    stats.metrics.close()
    ctl.send("stats", **stats.counts())
    ctl.close()
    inp.close(linger=0)
    out.close()
    ctx.term()


def _error_result(stream: str, seq: int, t_ns: int, message: str, meta: dict | None = None) -> list:
    return wire.encode_result(wire.Result(stream, seq, t_ns, "error", error=message, meta=meta or {}))


def _reject(out: zmq.Socket, stop: threading.Event, stats: WorkerStats, reason: str, stream: str | None,
            seq: int | None, t_ns: int, message: str) -> None:
    """Count a rejected message; answer it with an error result when it named its stream and seq."""
    stats.reject(reason)
    if stream is not None and seq is not None and send(out, _error_result(stream, seq, t_ns, f"rejected: {message}"),
                                                       stop):
        stats.error()


def inference_worker(model_dir: str | Path, frames_endpoints: list[str], out_endpoints: list[str], *,
                     deployment=None, batch: int = 8, batch_ms: float = 10.0,
                     hwm: int = 4, control: str | None = None, name: str = "infer0", curve=None,
                     metrics_port: int | None = None, stop: threading.Event | None = None) -> WorkerStats:
    """PULL frames (connect, to every producer of this model's streams), batch up to `batch` frames or
    `batch_ms` after the first, score, PUSH on (connect).

    Every kind of model: each frame is decoded once (a large JPEG at a reduced scale, as fit decoded its
    training frames: `Geometer.decode_shrink`) and prepared (resized, or cut into tiles) straight into the
    inspector's reused input buffer; the inputs of a batch's frames run together.
    """
    from calibration.model import Inspector, Model  # torch and onnxruntime load only here
    from engines.runtimes import Deployment

    stop = stop or threading.Event()
    stop_on_signals(stop)
    model = Model(model_dir)
    inspector = Inspector(model, deployment or Deployment(), batch)
    stats = WorkerStats(metrics=stage_metrics("worker", name, metrics_port, model))
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, hwm)
    if curve:
        curve.connect_to(inp, "producer")
    for endpoint in frames_endpoints:
        inp.connect(endpoint)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 4 * batch)
    out.setsockopt(zmq.LINGER, 5000)
    if curve:
        curve.connect_to(out, "postprocess")
    for endpoint in out_endpoints:
        out.connect(endpoint)
    ctl = Control(ctx, control, "infer", name)
    try:
        with inspector:
            # warm up at the batch shape before announcing readiness: ONNX Runtime plans its memory per
            # input shape, and the first full batch after a one-frame warm-up ran far slower than the rest
            warm = [np.zeros(model.spec.shape, np.uint8)] * batch
            for _ in range(WARM_BATCHES):
                inspector.inspect(warm)
            ctl.send("ready")
            while not stop.is_set():
                messages = _collect(inp, batch, batch_ms, stop)
                if messages:
                    _score_batch(inspector, messages, out, stats, stop)
                    ctl.send("stats", **stats.counts())
    finally:
        _shut(ctx, ctl, stats, inp, out, curve)
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


def _score_batch(inspector, messages: list, out: zmq.Socket, stats: WorkerStats, stop: threading.Event) -> None:
    """Decode, score and send on a batch of frame messages; a stop while the receiver holds back drops the rest."""
    from calibration.images import ImageError, to_rgb

    t_recv = time.time_ns()
    start = time.perf_counter()
    geometer = inspector.model.geometer
    frames, images, layouts = [], [], []
    for message in messages:
        try:
            frame = wire.decode(message)
            if not isinstance(frame, wire.Frame):
                raise wire.WireError("bad_kind", f"inference worker expects frames, got a {frame.kind} message")
        except wire.WireError as exc:
            _reject(out, stop, stats, exc.reason, exc.stream, exc.seq, exc.t_ns or t_recv, str(exc))
            continue
        if frame.error is not None:  # the source could not read it; account for it as an error
            if send(out, _error_result(frame.stream, frame.seq, frame.t_ns, frame.error, frame.meta), stop):
                stats.error()
            continue
        layout = geometer.layout(frame.shape[:2])  # the frame's own size, whatever size it is decoded at
        try:
            images.append(to_rgb(frame.image(geometer.decode_shrink(layout)), f"{frame.stream} frame {frame.seq}",
                                 keep_grey=True, bits=geometer.geometry.bits))  # widened to RGB after resizing: Geometer.prepare
        except (wire.WireError, ImageError) as exc:
            _reject(out, stop, stats, getattr(exc, "reason", "bad_payload"), frame.stream, frame.seq, frame.t_ns,
                    str(exc))
            continue
        frames.append(frame)
        layouts.append(layout)
    if not frames:
        return
    t_pre = time.perf_counter()
    results = inspector.inspect(images, layouts)
    t_done = time.perf_counter()
    n = len(frames)
    inputs = sum(l.count for l in layouts)
    timing = {"preprocess": 1000 * (t_pre - start) / n, "infer": 1000 * (t_done - t_pre) / n, "batch": float(n),
              "inputs": float(inputs)}
    model = inspector.model
    metrics = stats.metrics
    metrics.observe("batch_size", "frames per batch", n, BATCH_BUCKETS)
    metrics.observe("step_seconds", "seconds per frame in a step", (t_pre - start) / n, step="preprocess")
    metrics.observe("step_seconds", "seconds per frame in a step", (t_done - t_pre) / n, step="infer")
    for frame, image, r in zip(frames, images, results):
        queued = max(0.0, (t_recv - frame.t_ns) / 1e6)
        metrics.observe("queue_seconds", "frame creation to the inference worker", queued / 1000, LATENCY_BUCKETS)
        metrics.count("frames_scored", "frames scored", stream=frame.stream)
        # defective frames carry the canvas (the frame as the model saw it) for overlays; the rest need none
        canvas = model.geometer.canvas_image(image, r.layout) if model.is_defect(r.score) else None
        if not send(out, wire.encode_scored(frame, r.score, r.canvas_map, canvas, {"queue": queued, **timing},
                                            r.heat), stop):
            return
    stats.frames += n
    stats.batches += 1


def postprocess_worker(model_dir: str | Path, in_endpoint: str, sink_endpoint: str, *, overlays: Path | None = None,
                       attach_maps: bool = True, hwm: int = 32, control: str | None = None, name: str = "post0",
                       curve=None, metrics_port: int | None = None, stop: threading.Event | None = None) -> WorkerStats:
    """PULL scored frames (bound at in_endpoint), emit results to the sink (PUSH, connect).

    The verdict is the model's (calibration.model.Model.decide): defective when the normalised image
    score reaches 0.5. Defective frames get their regions (at the frame's size), the 8-bit defect map
    (normalised smoothed score x 255, frame size) and, when `overlays` is given, an overlay JPEG drawn
    on the canvas the model saw. Ok frames cost no map work at all.
    """
    from calibration.images import OVERLAY_JPEG, overlay_file
    from calibration.maps import defect_map as to_defect_map
    from calibration.maps import overlay
    from calibration.model import Model

    stop = stop or threading.Event()
    stop_on_signals(stop)
    model = Model(model_dir)
    stats = WorkerStats(metrics=stage_metrics("postprocess", name, metrics_port, model))
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, hwm)
    if curve:
        curve.serve(ctx, inp)
    inp.bind(in_endpoint)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 5000)
    if curve:
        curve.connect_to(out, "sink")
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
                _reject(out, stop, stats, exc.reason, exc.stream, exc.seq, exc.t_ns or time.time_ns(), str(exc))
                continue
            if isinstance(item, wire.Result):  # an error result from an inference worker: pass it on
                if send(out, wire.encode_result(item), stop):
                    stats.error()
                continue
            if not isinstance(item, wire.Scored):
                stats.reject("bad_kind")
                continue
            frame = item.shape[:2]
            decision = model.decide(item.grid_map, frame, item.score, item.heat)
            regions, defect_map = [], None
            if decision.verdict == "defect":
                regions = [wire.Region(b, a, p) for b, a, p in decision.regions]
                if attach_maps:
                    defect_map = to_defect_map(decision.heat, frame, model.geometer.roi_frame(frame))
                if overlays is not None and item.image is not None:  # at canvas size: line rate, not print quality
                    overlays.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(overlays / overlay_file(item.stream, item.seq)),
                                overlay(np.ascontiguousarray(item.image), decision.heat), OVERLAY_JPEG)
            timing = dict(item.timing)
            timing["post"] = 1000 * (time.perf_counter() - start)
            result = wire.Result(item.stream, item.seq, item.t_ns, decision.verdict, decision.score,
                                 tuple(regions), timing, None, defect_map, item.meta)
            if not send(out, wire.encode_result(result), stop):
                break
            stats.frames += 1
            stats.metrics.count("frames_decided", "frames decided, by verdict", verdict=decision.verdict)
            stats.metrics.observe("step_seconds", "seconds per frame in a step", time.perf_counter() - start,
                                  step="post")
            if time.monotonic() - last_stats > 0.5:
                ctl.send("stats", **stats.counts())
                last_stats = time.monotonic()
    finally:
        _shut(ctx, ctl, stats, inp, out, curve)
    return stats
