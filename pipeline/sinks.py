"""The sink: results in, each stream delivered in sequence order, every frame accounted for.

Outputs, any combination: a ZeroMQ PUB result stream (the wire's result messages, unchanged),
a JSONL log (one line per result, in sequence order per stream), and PNG defect maps of
defective frames. A frame whose result never comes (a worker died holding it) is reported as
an error result with error "lost: ..." once its stream has ended and the pipeline has drained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from calibration.artifact import replace_json
from calibration.images import frame_file, png_gray
from pipeline import wire
from pipeline.drift import DriftWatch, drift_reference
from pipeline.metrics import LATENCY_BUCKETS

log = logging.getLogger("lineguard.sink")


def _json_value(value) -> str:
    """A frame's meta value JSON has no type for (bytes, a msgpack extension): bytes as hex, the rest as text."""
    return bytes(value).hex() if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


class Reservoir:
    """A uniform sample of at most `size` of the values seen (reservoir sampling, seeded), their exact
    count and mean: percentiles of a run of any length in bounded memory."""

    def __init__(self, size: int = 20000, seed: int = 0):
        self.values = np.empty(size, np.float64)
        self.count = 0
        self.total = 0.0
        self.rng = np.random.default_rng(seed)

    def add(self, value: float) -> None:
        size = len(self.values)
        if self.count < size:
            self.values[self.count] = value
        else:
            slot = int(self.rng.integers(self.count + 1))
            if slot < size:
                self.values[slot] = value
        self.count += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        n = min(self.count, len(self.values))
        return float(np.percentile(self.values[:n], q)) if n else 0.0


LOST_SKIPPED = (f"lost: no result arrived while more than {wire.MAX_ACK_MISSING} later frames of its stream "
                "were missing; its producer has given it up")


@dataclasses.dataclass
class Ledger:
    """One stream's accounting. Results are released in seq order; a gap is skipped (and recorded)
    only when more than `window` later results wait behind it; a result for a skipped seq is then
    released late, flagged as such. Every seq is released exactly once."""

    stream: str
    window: int
    next_seq: int = 0
    pending: dict = dataclasses.field(default_factory=dict)
    skipped: set = dataclasses.field(default_factory=set)
    expected: int | None = None
    dropped: int = 0
    duplicates: int = 0
    gaps: int = 0
    late: int = 0
    beyond_end: int = 0
    lost_seqs: list = dataclasses.field(default_factory=list)

    def accept(self, result: wire.Result) -> list[tuple[wire.Result, bool]]:
        """Add a result; returns [(result, late)] now releasable, in order. More skipped seqs than an
        ack may list (wire.MAX_ACK_MISSING): the oldest are declared lost, long since abandoned by
        their producer, so the acks go on covering what is logged."""
        seq = result.seq
        if self.expected is not None and seq >= self.expected:
            self.beyond_end += 1  # its stream said it sent fewer frames: not a frame of this stream
            return []
        if seq < self.next_seq:
            if seq in self.skipped:
                self.skipped.discard(seq)
                self.late += 1
                return [(result, True)]
            self.duplicates += 1
            return []
        if seq in self.pending:
            self.duplicates += 1
            return []
        self.pending[seq] = result
        out = self._release()
        if len(self.pending) > self.window:
            first = min(self.pending)
            self.skipped.update(range(self.next_seq, first))
            self.gaps += first - self.next_seq
            self.next_seq = first
            out += self._release()
        return out + self.give_up()

    def give_up(self) -> list[tuple[wire.Result, bool]]:
        """A lost result for each of the oldest skipped seqs beyond what an ack may list."""
        out = []
        while len(self.skipped) > wire.MAX_ACK_MISSING:
            oldest = min(self.skipped)
            self.skipped.discard(oldest)
            self.lost_seqs.append(oldest)
            out.append((wire.Result(self.stream, oldest, 0, "error", error=LOST_SKIPPED), True))
        return out

    def _release(self) -> list[tuple[wire.Result, bool]]:
        out = []
        while self.next_seq in self.pending:
            out.append((self.pending.pop(self.next_seq), False))
            self.next_seq += 1
        return out

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.next_seq >= self.expected and not self.pending and not self.skipped

    def ack(self) -> list:
        """The cumulative acknowledgement message of this stream (wire.encode_ack). It covers exactly
        the seqs released (logged), not skipped ones, nor the results only waiting in memory behind
        a gap, which a killed sink loses: those it names as held, so the producer keeps them without
        sending them again. `accept` keeps the skipped seqs within what an ack may list."""
        held = sorted(self.pending)[:wire.MAX_ACK_MISSING]
        return wire.encode_ack(self.stream, self.next_seq, sorted(self.skipped), self.complete, held)

    def resume(self, released: set[int]) -> None:
        """Continue after a restart from the seqs already released (logged): those below the highest
        that are not among them are waiting for a late result."""
        if released:
            self.next_seq = max(released) + 1
            self.skipped = set(range(self.next_seq)) - released

    def missing(self) -> list[int]:
        """Seqs without a result (only meaningful after end of stream)."""
        end = max(self.expected or 0, self.next_seq, max(self.pending, default=-1) + 1)
        waiting = set(self.pending)
        return sorted(self.skipped | {s for s in range(self.next_seq, end) if s not in waiting})

    def flush(self, lost_message: str) -> list[tuple[wire.Result, bool]]:
        """Release everything left, in seq order: waiting results, and a lost error result per missing seq."""
        self.lost_seqs += self.missing()
        rest = {s: wire.Result(self.stream, s, 0, "error", error=lost_message) for s in self.missing()}
        rest.update(self.pending)
        out = [(rest[s], s < self.next_seq) for s in sorted(rest)]
        self.pending.clear()
        self.skipped.clear()
        self.next_seq = max(self.next_seq, max(rest, default=-1) + 1)
        return out


class Sink:
    """Counts, orders and writes results; see the module docstring.

    The JSONL log is written through: flushed to the operating system as each result is released
    (a reader following it sees every verdict at once, and a sink killed with kill -9 loses none it
    had released) and fsync'd at most `fsync_s` seconds later (a power cut loses at most that).
    resume: continue an existing log (after a restart): its results count, its seqs are not logged
    again (a truncated last line, from a kill in mid-write, is cut off).
    """

    def __init__(self, jsonl: Path | None = None, maps_dir: Path | None = None, pub: zmq.Socket | None = None,
                 window: int = 256, resume: bool = False, fsync_s: float = 1.0, metrics=None,
                 drift_reference: np.ndarray | dict[str, np.ndarray] | None = None, view=None):
        from pipeline.metrics import NoMetrics

        self.metrics = metrics or NoMetrics()
        self.drift_reference = drift_reference  # one for every stream, or per stream
        self.drift: dict[str, DriftWatch] = {}
        self.stream_counts: dict[str, dict[str, int]] = {}
        self.view = view  # a pipeline.view.View shown every released result
        self.streams: dict[str, Ledger] = {}
        self.counts = {"ok": 0, "defect": 0, "error": 0}
        self.lost = 0
        self.window = window
        self.resumed = 0
        self.jsonl = None
        self.ends = None
        if jsonl:
            self.ends = Path(jsonl).with_suffix(".ends.json")  # each stream's eos, which the log has no line for
            if resume and Path(jsonl).is_file():
                self._resume(Path(jsonl))
            elif not resume:
                self.ends.unlink(missing_ok=True)  # an earlier run's
            self.jsonl = open(jsonl, "a" if resume else "w")
        self.fsync_s = fsync_s
        self.last_fsync = time.monotonic()
        self.maps_dir = maps_dir
        self.pub = pub
        self.rejected: dict[str, int] = {}
        self.latencies = Reservoir()  # ms, frame creation to the sink (bounded: a line runs for months)
        self.timing: dict[str, Reservoir] = {}
        self.first_t_ns: int | None = None
        self.last_ns: int | None = None
        for ledger in list(self.streams.values()):  # a resumed log with more gaps than an ack may list
            self._emit(ledger.give_up())

    def _resume(self, path: Path) -> None:
        data = path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]  # a line cut by a kill in mid-write is dropped
        if len(whole) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(whole))
        released: dict[str, set[int]] = {}
        for line in whole.decode().splitlines():
            record = json.loads(line)
            released.setdefault(record["stream"], set()).add(record["seq"])
            self.counts[record["verdict"]] += 1
            self.stream_counts.setdefault(record["stream"], {"ok": 0, "defect": 0, "error": 0})[record["verdict"]] += 1
            self.lost += bool(record.get("error") and record["error"].startswith("lost"))
            self.resumed += 1
        for stream, seqs in released.items():
            self.ledger(stream).resume(seqs)
        try:  # streams that had ended: a producer that got every verdict sends its eos no more
            ends = json.loads(self.ends.read_text())
        except FileNotFoundError:
            ends = {}
        for stream, (count, dropped) in ends.items():
            ledger = self.ledger(stream)
            ledger.expected, ledger.dropped = count, dropped

    def _record_end(self, ledger: Ledger) -> None:
        """Keep the stream ends beside the log, written through before any ack can say a stream is done."""
        if self.ends is None:
            return
        replace_json(self.ends, {l.stream: [l.expected, l.dropped] for l in self.streams.values()
                                 if l.expected is not None})

    def ledger(self, stream: str) -> Ledger:
        if stream not in self.streams:
            self.streams[stream] = Ledger(stream, self.window)
        return self.streams[stream]

    def handle(self, message: list) -> None:
        now = time.time_ns()
        try:
            item = wire.decode(message)
        except wire.WireError as exc:
            self.reject(exc.reason)
            return
        if isinstance(item, wire.Eos):
            ledger = self.ledger(item.stream)
            if (ledger.expected, ledger.dropped) != (item.count, item.dropped):  # not a repeat
                ledger.expected, ledger.dropped = item.count, item.dropped
                self._record_end(ledger)
            self.metrics.set("dropped_frames", "frames the producer dropped (live sources)", item.dropped,
                             stream=item.stream)
        elif isinstance(item, wire.Result):
            if item.verdict != "error" or item.t_ns:
                self.latencies.add((now - item.t_ns) / 1e6)
                self.metrics.observe("latency_seconds", "frame creation to the sink", (now - item.t_ns) / 1e9,
                                     LATENCY_BUCKETS, stream=item.stream)
                self.first_t_ns = item.t_ns if self.first_t_ns is None else min(self.first_t_ns, item.t_ns)
            self.last_ns = now
            for stage, ms in item.timing.items():
                self.timing.setdefault(stage, Reservoir()).add(ms)
            ledger = self.ledger(item.stream)
            duplicates = ledger.duplicates
            self._emit(ledger.accept(item))
            if ledger.duplicates > duplicates:
                self.metrics.count("duplicates", "results dropped as duplicates", stream=item.stream)
            self.metrics.set("waiting_results", "results held for ordering", len(ledger.pending), stream=item.stream)
        else:
            self.reject("bad_kind")

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.metrics.count("rejected", "messages rejected, by reason", n, reason=reason)

    def _emit(self, released: list[tuple[wire.Result, bool]]) -> None:
        for result, late in released:
            self.counts[result.verdict] += 1
            per_stream = self.stream_counts.setdefault(result.stream, {"ok": 0, "defect": 0, "error": 0})
            per_stream[result.verdict] += 1
            self.metrics.count("results", "results released, by verdict", stream=result.stream, verdict=result.verdict)
            if result.error and result.error.startswith("lost"):
                self.lost += 1
                self.metrics.count("lost", "frames without a result, declared lost", stream=result.stream)
            if late:
                self.metrics.count("late", "results released after later ones", stream=result.stream)
            if result.score is not None and self.drift_reference is not None:
                self._watch(result.stream, result.score)
            if self.view is not None:
                self.view.observe(result, late)
            if self.pub is not None:
                self.pub.send_multipart(wire.encode_result(result), copy=False)
            if self.jsonl is not None:
                record = {"stream": result.stream, "seq": result.seq, "verdict": result.verdict,
                          "score": result.score, "regions": [{"bbox": list(r.bbox), "area": r.area, "score": r.score}
                                                             for r in result.regions],
                          "timing": result.timing, "error": result.error, "t_ns": result.t_ns}
                if result.meta:
                    record["meta"] = result.meta
                if late:
                    record["late"] = True
                self.jsonl.write(json.dumps(record, default=_json_value) + "\n")
            if self.maps_dir is not None and result.defect_map is not None:
                path = self.maps_dir / frame_file(result.stream, result.seq, ".png")
                try:
                    self.maps_dir.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(png_gray(result.defect_map))
                except OSError as exc:  # the result itself is logged already: the run goes on
                    log.error("could not write the defect map %s (%s); check the space and permissions of %s",
                              path, exc, self.maps_dir)
        if released and self.jsonl is not None:
            self.jsonl.flush()  # written through: visible to readers, and safe from a kill of this process
            if time.monotonic() - self.last_fsync > self.fsync_s:
                os.fsync(self.jsonl.fileno())
                self.last_fsync = time.monotonic()

    def _watch(self, stream: str, score: float) -> None:
        watch = self.drift.get(stream)
        if watch is None:
            reference = self.drift_reference
            reference = reference.get(stream) if isinstance(reference, dict) else reference
            if reference is None:
                return
            watch = self.drift[stream] = DriftWatch(reference)
        if watch.add(score):
            if watch.alarm:
                log.warning("drift on %s: its scores no longer look like the calibration's (KS D %.2f, p %.1e); "
                            "re-calibrate: refit the model on current normal images", stream, *watch.last)
            else:
                log.warning("drift on %s: cleared (KS D %.2f)", stream, watch.last[0])
        if watch.last is not None:
            self.metrics.set("drift_statistic", "KS statistic of recent scores against the calibration's",
                             watch.last[0], stream=stream)
            self.metrics.set("drift_alarm", "1 while a stream's scores have drifted from the calibration's",
                             float(watch.alarm), stream=stream)

    def drift_state(self) -> dict:
        """Per stream its drift watch, or why there is none."""
        if self.drift_reference is None:
            return {"off": "no calibration scores: start the sink with --model (a model fitted by this version)"}
        return {stream: watch.state() for stream, watch in self.drift.items()}

    def complete(self, streams: int) -> bool:
        return streams > 0 and self.ended >= streams and all(l.complete for l in self.streams.values())

    @property
    def ended(self) -> int:
        """Streams whose end (eos) has arrived."""
        return sum(l.expected is not None for l in self.streams.values())

    def drain(self, why: str) -> None:
        """Declare every missing frame of every ended stream lost."""
        for ledger in self.streams.values():
            if ledger.expected is not None:
                self._emit(ledger.flush(f"lost: no result arrived ({why})"))

    @property
    def results(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict:
        lat = self.latencies
        span = (self.last_ns - self.first_t_ns) / 1e9 if self.last_ns and self.first_t_ns else 0.0
        stages = {k: {"mean": v.mean, "p50": v.percentile(50), "p99": v.percentile(99)}
                  for k, v in self.timing.items() if k != "batch"}
        batch = self.timing.get("batch")
        return {
            "frames_in": sum(l.expected or 0 for l in self.streams.values()),
            "results": self.results, **self.counts,
            "lost": self.lost,
            "dropped": sum(l.dropped for l in self.streams.values()),
            "rejected": dict(self.rejected),
            "duplicates": sum(l.duplicates for l in self.streams.values()),
            "beyond_end": sum(l.beyond_end for l in self.streams.values()),
            "out_of_order_gaps": sum(l.gaps for l in self.streams.values()),
            "fps": self.results / span if span > 0 else 0.0,
            "latency_ms": {"p50": lat.percentile(50), "p99": lat.percentile(99)},
            "stage_ms": stages,
            "mean_batch": batch.mean if batch else 0.0,
            "streams": {name: {"expected": l.expected, **self.stream_counts.get(name, {"ok": 0, "defect": 0, "error": 0}),
                               "lost": l.lost_seqs[:10000], "late": l.late, "dropped": l.dropped,
                               "duplicates": l.duplicates}
                        for name, l in self.streams.items()},
            "resumed_from_log": self.resumed,
            "drift": self.drift_state(),
        }

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
            self.jsonl.close()


def run_sink(results_endpoint: str, *, pub_endpoint: str | None = None, jsonl: Path | None = None,
             maps_dir: Path | None = None, streams: int = 1, drain_timeout: float = 5.0, window: int = 256,
             control: str | None = None, acks_endpoint: str | None = None, resume: bool = False,
             curve=None, metrics=None, models: dict[str, Path] | Path | None = None,
             view_port: int | None = None, overlays: Path | None = None,
             stop: threading.Event | None = None) -> dict:
    """PULL results and eos (bound at results_endpoint) until `streams` streams have ended and drained.

    streams = 0 runs until stopped. A stream that has ended but still misses results after
    drain_timeout seconds without any new message (result or eos: a producer still re-sending
    repeats its eos) has them declared lost. acks_endpoint: PUB (bound) of every stream's
    cumulative acknowledgement, 5 times a second, for producers that re-send what has no verdict.
    resume: continue an existing JSONL log (a restarted sink). curve: a pipeline.security.Curve
    (role sink): every bound socket a CURVE server; refused senders are counted as rejected
    ("unauthorised"). metrics: a pipeline.metrics.Metrics to count into. models: the model (or per
    stream name its model) whose normal calibration scores the drift watch compares with (pipeline.drift).
    view_port: serve the live web view there (pipeline.view), showing the overlays the postprocess
    workers write to `overlays`. Returns the summary.
    """
    from pipeline.workers import Control, stop_on_signals

    stop = stop or threading.Event()
    stop_on_signals(stop)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    if curve:
        curve.serve(ctx, inp)
    inp.bind(results_endpoint)
    pub = None
    if pub_endpoint:
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 10000)
        if curve:
            curve.serve(ctx, pub)
        pub.bind(pub_endpoint)
    acks = None
    if acks_endpoint:
        acks = ctx.socket(zmq.PUB)
        if curve:
            curve.serve(ctx, acks)
        acks.bind(acks_endpoint)
    ctl = Control(ctx, control, "sink", "sink")
    if isinstance(models, dict):
        reference = {stream: r for stream, model in models.items() if (r := drift_reference(model)) is not None}
    else:
        reference = drift_reference(models) if models is not None else None
    view = None
    if view_port is not None:
        from pipeline.view import View

        view = View(view_port, models, overlays)
    sink = Sink(jsonl, maps_dir, pub, window, resume=resume, metrics=metrics, drift_reference=reference, view=view)
    ctl.send("ready")
    last_activity = time.monotonic()
    last_status = last_ack = 0.0
    try:
        while not stop.is_set():
            if acks is not None and time.monotonic() - last_ack > 0.2:
                last_ack = time.monotonic()
                for ledger in sink.streams.values():
                    acks.send_multipart(ledger.ack())
            if inp.poll(100):
                sink.handle(inp.recv_multipart(copy=False))
                last_activity = time.monotonic()
                while inp.poll(0):  # drain what is queued before checking anything else
                    sink.handle(inp.recv_multipart(copy=False))
            if sink.complete(streams):
                break
            ended = streams > 0 and sink.ended >= streams
            if ended and time.monotonic() - last_activity > drain_timeout:
                sink.drain(f"none within {drain_timeout:g} s after the last result; a worker may have died")
                break
            if time.monotonic() - last_status > 0.5:
                last_status = time.monotonic()
                ctl.send("status", **_status(sink))
                if view is not None:
                    view.set_drift(sink.drift_state())
        if curve:
            for reason, n in curve.refusals.counts.items():
                sink.reject(reason, n)
        summary = sink.summary()
        ctl.send("stats", **summary)
        if acks is not None:
            for ledger in sink.streams.values():
                acks.send_multipart(ledger.ack())
        return summary
    finally:
        sink.close()
        if view is not None:
            view.close()
        if curve:
            curve.close()
        ctl.close()
        inp.close(linger=0)
        for sock in (pub, acks):
            if sock is not None:
                sock.close(linger=1000)
        ctx.term()


def _status(sink: Sink) -> dict:
    span = (sink.last_ns - sink.first_t_ns) / 1e9 if sink.last_ns and sink.first_t_ns else 0.0
    return {"results": sink.results, "fps": sink.results / span if span > 0 else 0.0,
            "defect": sink.counts["defect"], "error": sink.counts["error"],
            "dropped": sum(l.dropped for l in sink.streams.values()),
            "drift": sorted(stream for stream, watch in sink.drift.items() if watch.alarm)}
