"""Frame sources and the producer that sends their frames over ZeroMQ.

A source yields `SourceFrame`s: raw RGB / grey pixels, or an encoded file sent as it is (the
worker decodes it once). Delivery modes:

- lossless (files, video files, synthetic): the sender blocks on backpressure (high-water
  marks), so nothing is dropped and the source is read no faster than the line consumes it;
- live (cameras): a capture thread never blocks on the camera; frames wait in a small ring and
  the oldest is dropped, counted and reported when the sender falls behind.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import zmq

from calibration import images
from calibration.dataset import IMAGE_SUFFIXES
from calibration.synthetic import DEFECT_TYPES, normal_frame, plant_defect
from engines.errors import ConfigError, LineguardError
from pipeline import wire
from pipeline.metrics import NoMetrics
from pipeline.workers import send

log = logging.getLogger("lineguard.producer")

MODES = ("lossless", "live")


class SourceError(LineguardError):
    """A source that cannot be opened or read."""


@dataclasses.dataclass
class SourceFrame:
    """pixels: uint8 [H, W, C] (RGB) for raw frames; or encoded: the bytes of a jpeg / png file with its shape;
    or neither, with `error`, for a frame the source could not read."""

    pixels: np.ndarray | None = None
    encoded: bytes | None = None
    encoding: str = "raw"
    shape: tuple[int, int, int] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    error: str | None = None  # the source could not read this frame: it still gets a (error) result


class Source:
    """Iterable of SourceFrame; `live` sources are read by a capture thread that never blocks.
    missed: frames the source knows it never delivered (a camera's lost or incomplete frames)."""

    live = False
    name = "source"
    missed = 0

    def __iter__(self) -> Iterator[SourceFrame]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderSource(Source):
    """Every image file under a folder (recursively, sorted), `repeat` times, at most `limit` frames
    (0: no limit); jpeg / png files are sent undecoded."""

    def __init__(self, folder: Path, repeat: int = 1, limit: int = 0):
        self.folder = Path(folder)
        self.name = str(folder)
        if not self.folder.is_dir():
            raise SourceError(f"source folder {self.folder} not found; give a folder of images")
        self.paths = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SourceError(f"source folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.repeat, self.limit = repeat, limit

    def __iter__(self) -> Iterator[SourceFrame]:
        paths = [p for _ in range(self.repeat) for p in self.paths]
        for path in paths[:self.limit or None]:
            yield self.read(path)

    def read(self, path: Path) -> SourceFrame:
        rel = str(path.relative_to(self.folder))
        try:
            data = path.read_bytes()
        except OSError as exc:  # removed or unreadable since the folder was listed: an error result, not the line's end
            return SourceFrame(meta={"file": rel}, error=f"{rel}: cannot be read ({exc.strerror})")
        encoding = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}.get(path.suffix.lower())
        shape = images.file_shape(memoryview(data), encoding) if encoding else None
        eight_bit = encoding == "jpeg" or images.png_bit_depth(data) == 8
        if shape is not None and eight_bit:  # sent as the file; the worker decodes it once, grey or RGB
            return SourceFrame(encoded=data, encoding=encoding, shape=shape, meta={"file": rel})
        # other formats, 16-bit files and files whose header we cannot read: decode here, send raw (grey as
        # grey, 16-bit as 16-bit: the worker scales it by its model's bit depth)
        try:
            return SourceFrame(pixels=images.decode(data, str(path), keep_grey=True, bits=None), meta={"file": rel})
        except images.ImageError as exc:
            return SourceFrame(meta={"file": rel}, error=str(exc))


class VideoSource(Source):
    """Frames of a video file (lossless) or an OpenCV camera / RTSP stream (live). A video file that
    ends before the frame count its container gives (cut short, damaged) counts the rest in `missed`,
    with a warning; a camera or stream whose read fails is reopened every second, for up to `give_up_s`
    (`reconnects`), then it ends (a file read live, as a stand-in camera, ends at its end)."""

    def __init__(self, target: str | int, live: bool, limit: int = 0, give_up_s: float = 60.0):
        self.target, self.live, self.limit, self.give_up_s = target, live, limit, give_up_s
        self.name = str(target)
        self.reconnects = 0
        self.capture = cv2.VideoCapture(target)
        if not self.capture.isOpened():
            what = "camera" if live else "video file"
            raise SourceError(f"cannot open {what} {target!r}; check the device index, URL or path "
                              "(OpenCV must support its format)")

    def __iter__(self) -> Iterator[SourceFrame]:
        n = 0
        while not self.limit or n < self.limit:
            ok, bgr = self.capture.read()
            if not ok and self.live and not Path(self.name).is_file() and self._reopen():
                continue
            if not ok:
                break
            n += 1
            yield SourceFrame(pixels=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), meta={"frame": n - 1})
        expected = 0 if self.live else int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if expected > n and not (self.limit and n >= self.limit):
            self.missed = expected - n
            log.warning("%s: read %d of the %d frames its container gives; the file is cut short or damaged",
                        self.target, n, expected)

    def _reopen(self) -> bool:
        """A live source that failed to read: open it again every second until it delivers or give_up_s."""
        deadline = time.monotonic() + self.give_up_s
        while time.monotonic() < deadline:
            self.capture.release()
            time.sleep(1.0)
            self.capture = cv2.VideoCapture(self.target)
            if self.capture.isOpened():
                self.reconnects += 1
                log.warning("%s: read failed; reopened (%d so far)", self.target, self.reconnects)
                return True
        log.warning("%s: read failed and it could not be reopened within %g s; the stream ends", self.target,
                    self.give_up_s)
        return False

    def close(self) -> None:
        self.capture.release()


class GenICamSource(Source):
    """A GenICam camera through Aravis (pipeline.genicam), live. A camera silent for `timeout_s` is
    reopened (for up to `give_up_s`, then the source ends); frames lost meanwhile (device frame ids)
    and incomplete frames are counted in `missed`, reopenings in `reconnects`."""

    live = True

    def __init__(self, wanted: str, settings: dict[str, str] | None = None, limit: int = 0, timeout_s: float = 2.0,
                 give_up_s: float = 60.0):
        from pipeline.genicam import GenICamCamera

        self.wanted, self.settings, self.limit = wanted, dict(settings or {}), limit
        self.timeout_s, self.give_up_s = timeout_s, give_up_s
        self.name = f"genicam:{wanted}"
        self.camera = GenICamCamera(wanted, self.settings)
        self.reconnects = 0
        self.closed = False

    def __iter__(self) -> Iterator[SourceFrame]:
        from pipeline.genicam import GenICamError, reopen

        n, last_id = 0, None
        while not self.closed and (not self.limit or n < self.limit):
            try:
                got = self.camera.grab(self.timeout_s)
            except images.ImageError:
                self.missed += 1
                continue
            except GenICamError:
                got = None
            if got is None:  # silent or gone: open it again
                self.camera.close()
                camera = reopen(self.wanted, self.settings, self.give_up_s, lambda: self.closed)
                if camera is None:
                    return
                self.camera, self.reconnects = camera, self.reconnects + 1
                continue
            image, frame_id, timestamp = got
            if last_id is not None and frame_id > last_id + 1:
                self.missed += frame_id - last_id - 1
            last_id = frame_id
            n += 1
            yield SourceFrame(pixels=image, meta={"frame_id": frame_id, "timestamp_ns": timestamp,
                                                  "camera": self.camera.readback})

    def close(self) -> None:
        self.closed = True
        self.camera.close()


class SyntheticSource(Source):
    """Textured product frames, a fraction with planted defects (meta "planted": kind), from a cycled pool."""

    name = "synthetic"

    def __init__(self, frames: int, size: int = 256, defect_rate: float = 0.25, seed: int = 0, pool: int = 48):
        if not 0.0 <= defect_rate <= 1.0:
            raise ConfigError(f"defect rate {defect_rate} must be in [0, 1]")
        rng = np.random.default_rng(seed + 1000)  # not the fitting seed: these are unseen frames
        self.pool = []
        for i in range(pool):
            image = normal_frame(rng, size)
            kind = DEFECT_TYPES[i % len(DEFECT_TYPES)] if rng.random() < defect_rate else None
            if kind:
                image, _ = plant_defect(image, rng, kind)
            self.pool.append((image, kind))
        self.frames = frames

    def __iter__(self) -> Iterator[SourceFrame]:
        for i in range(self.frames):
            image, kind = self.pool[i % len(self.pool)]
            yield SourceFrame(pixels=image, meta={"planted": kind} if kind else {})


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """frames: to take (0: all; synthetic: 300); size: synthetic frame side; seed: synthetic frames;
    camera: GenICam settings (pipeline.genicam.parse_settings)."""

    frames: int = 0
    size: int = 256
    seed: int = 0
    camera: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One kind of source in SOURCES: which specs it takes, how it reads a spec into its target
    (validated, nothing opened: a supervisor checks before it starts stages), and how it opens it."""

    name: str
    example: str
    matches: Callable[[str], bool]
    target: Callable[[str], object]
    open: Callable[[object, SourceOptions], Source]


def _camera_index(spec: str) -> int:
    index = spec.split(":", 1)[1]
    if not index.isdigit():
        raise ConfigError(f"camera source {spec!r}: expected camera:N with N a device index, e.g. camera:0")
    return int(index)


def _genicam_name(spec: str) -> str:
    wanted = spec.split(":", 1)[1]
    if not wanted:
        raise ConfigError(f"genicam source {spec!r}: expected genicam:SERIAL (or a device id or address); "
                          "lineguard cameras lists them")
    return wanted


SOURCES: tuple[SourceKind, ...] = (
    SourceKind("synthetic", "synthetic", lambda s: s == "synthetic", lambda s: None,
               lambda _, o: SyntheticSource(o.frames or 300, size=o.size, seed=o.seed)),
    SourceKind("camera", "camera:N", lambda s: s.startswith("camera:"), _camera_index,
               lambda index, o: VideoSource(index, live=True, limit=o.frames)),
    SourceKind("genicam", "genicam:SERIAL", lambda s: s.startswith("genicam:"), _genicam_name,
               lambda wanted, o: GenICamSource(wanted, o.camera, limit=o.frames)),
    SourceKind("stream", "an rtsp:// URL", lambda s: s.startswith(("rtsp://", "rtsps://", "http://", "https://")),
               str, lambda url, o: VideoSource(url, live=True, limit=o.frames)),
    SourceKind("folder", "a folder of images", lambda s: Path(s).is_dir(), Path,
               lambda path, o: FolderSource(path, limit=o.frames)),
    SourceKind("video", "a video file", lambda s: Path(s).is_file(), str,
               lambda path, o: VideoSource(path, live=False, limit=o.frames)),
)


def parse_source(spec: str) -> tuple[SourceKind, object]:
    """The SOURCES entry that takes `spec` and its target; SourceError / ConfigError naming the fix."""
    for kind in SOURCES:
        if kind.matches(spec):
            return kind, kind.target(spec)
    raise SourceError(f"source {spec!r} not found; give " + ", ".join(k.example for k in SOURCES[:-1]) +
                      f" or {SOURCES[-1].example}")


def check_source(spec: str) -> None:
    """Raise the error open_source would, without opening anything (for a supervisor, before it starts stages)."""
    parse_source(spec)


def open_source(spec: str, frames: int = 0, size: int = 256, seed: int = 0, camera: dict | None = None) -> Source:
    """A Source for any spec SOURCES takes: 'synthetic', 'camera:N', 'genicam:SERIAL', an rtsp:// /
    http:// URL, a folder, a video file."""
    kind, target = parse_source(spec)
    return kind.open(target, SourceOptions(frames, size, seed, dict(camera or {})))


@dataclasses.dataclass
class ProducerStats:
    sent: int = 0
    dropped: int = 0  # live frames the producer dropped because the line could not keep up
    resent: int = 0
    abandoned: int = 0
    missed: int = 0  # frames the source never delivered (a camera's lost or incomplete frames)


class Redispatch:
    """Frames sent but without a verdict yet, kept until the sink acknowledges them (wire.Ack) and
    sent again when they go without one: the frames a worker held when it died or stalled, or whose
    results a dying postprocess worker or sink never passed on. The n-th send of a frame waits
    retry_after * 2**(n-1) seconds for its verdict (exponential backoff: a line slowed by a restart
    is not flooded with copies of frames it still holds); after `attempts` sends the frame is
    abandoned (the sink reports it lost). At most `window` frames are in flight: a full window holds
    the source back (a live source then drops, and counts, camera frames), which also bounds the
    line's latency to about window / rate. Frames whose results the sink holds unlogged behind a gap
    (the ack's `held`) are kept but do not count against the window, and their wait restarts with
    every ack that names them: once a restarted sink no longer does, they go again."""

    def __init__(self, acks: zmq.Socket, stats: ProducerStats, retry_after: float, window: int,
                 attempts: int = 4):
        self.acks, self.stats = acks, stats
        self.retry_after, self.window, self.attempts = retry_after, window, attempts
        self.waiting: dict[int, list] = {}  # seq -> [message, last sent (monotonic), times sent]
        self.held: set[int] = set()  # waiting seqs the sink's last ack says it holds
        self.done = False

    def add(self, seq: int, message: list) -> None:
        self.waiting[seq] = [message, time.monotonic(), 1]

    def resent(self, seq: int) -> None:
        """`seq` went out once more: its wait for a verdict starts again, twice as long."""
        entry = self.waiting[seq]
        entry[1], entry[2] = time.monotonic(), entry[2] + 1
        self.stats.resent += 1

    @property
    def sending(self) -> int:
        """Frames awaiting a verdict that this producer may still send: those the sink does not hold."""
        return len(self.waiting) - len(self.held)

    @property
    def full(self) -> bool:
        return self.sending >= self.window

    def poll(self, stream: str) -> None:
        """Take in every queued acknowledgement of `stream`."""
        while self.acks.poll(0):
            try:
                ack = wire.decode(self.acks.recv_multipart())
            except wire.WireError:
                continue
            if not isinstance(ack, wire.Ack) or ack.stream != stream:
                continue
            for seq in [q for q in self.waiting if ack.covers(q)]:
                del self.waiting[seq]
            self.held = {q for q in ack.held if q in self.waiting}
            now = time.monotonic()
            for seq in self.held:
                self.waiting[seq][1] = now
            self.done = ack.done

    def overdue(self) -> list[int]:
        """Seqs to send again now; abandons those whose last send has gone unanswered."""
        now = time.monotonic()
        due = []
        for seq, (_, sent, times) in list(self.waiting.items()):
            if now - sent >= self.retry_after * 2 ** (times - 1):
                if times >= self.attempts:
                    del self.waiting[seq]
                    self.held.discard(seq)
                    self.stats.abandoned += 1
                else:
                    due.append(seq)
        return due


def produce(source: Source, frames_endpoint: str, sink_endpoint: str, stream: str = "cam0", mode: str | None = None,
            ring: int = 4, hwm: int = 8, hold: float | None = None, acks_endpoint: str | None = None,
            retry_after: float = 10.0, window: int = 64, curve=None, metrics=None,
            stop: threading.Event | None = None, end: threading.Event | None = None) -> ProducerStats:
    """Send every frame of source to frames_endpoint (PUSH, bound), then eos to sink_endpoint (PUSH, connected).

    acks_endpoint: the sink's acknowledgements (SUB, connected). With it every frame is kept until
    the sink has its verdict and sent again after `retry_after` seconds without one (doubling with
    each send), with at most `window` frames awaiting their verdicts (Redispatch);
    after the end of the stream the producer goes on re-sending (and repeating its eos, so a
    restarted sink learns the count) until the sink acknowledges the whole stream. Then, or without
    acks right after the eos, the sockets stay open until `stop` is set (a supervisor does that
    once the sink has every result) or `hold` seconds have passed (None: until stopped).
    curve: a pipeline.security.Curve (role producer) for CURVE on every socket. metrics: a
    pipeline.metrics.Metrics, given the counters as they grow.

    Frames a source could not read are sent too (a 1x1 frame with the header's "error" field), so
    the sink accounts for them as error results. Returns the counters.

    end: once set, no more frames are taken from the source: the stream ends with the frames sent so
    far, whose verdicts are awaited as at a source's own end (Ctrl-C on a camera). stop: leave now.
    """
    mode = mode or ("live" if source.live else "lossless")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    stop = stop or threading.Event()
    end = end or threading.Event()
    metrics = metrics or NoMetrics()
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, hwm)
    if curve:
        curve.serve(ctx, out)
    out.bind(frames_endpoint)
    eos = ctx.socket(zmq.PUSH)
    eos.setsockopt(zmq.LINGER, 5000)
    if curve:
        curve.connect_to(eos, "sink")
    eos.connect(sink_endpoint)
    stats = ProducerStats()
    redispatch = None
    if acks_endpoint:
        acks = ctx.socket(zmq.SUB)
        acks.setsockopt(zmq.SUBSCRIBE, b"")
        acks.setsockopt(zmq.LINGER, 0)
        if curve:
            curve.connect_to(acks, "sink")
        acks.connect(acks_endpoint)
        redispatch = Redispatch(acks, stats, retry_after, window)

    reported = ProducerStats()

    def report() -> None:
        """The counters' growth since the last report, into the metrics."""
        for field in dataclasses.fields(ProducerStats):
            grown = getattr(stats, field.name) - getattr(reported, field.name)
            if grown:
                metrics.count(f"frames_{field.name}", f"frames {field.name}", grown, stream=stream)
                setattr(reported, field.name, getattr(stats, field.name))
        if redispatch is not None:
            metrics.set("unacknowledged_frames", "frames sent and kept until the sink has their verdict",
                        len(redispatch.waiting), stream=stream)

    def tend() -> None:
        """Acknowledgements in, overdue frames out again."""
        report()
        redispatch.poll(stream)
        for seq in redispatch.overdue():
            try:
                out.send_multipart(redispatch.waiting[seq][0], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # the workers are busy: the next round tries again
            redispatch.resent(seq)

    try:
        def taking() -> bool:
            return not (stop.is_set() or end.is_set())

        frames = _live_frames(source, ring, stats, taking) if mode == "live" else iter(source)
        for seq, item in enumerate(frames):
            while redispatch is not None and redispatch.full and taking():
                tend()
                stop.wait(0.01)
            message = _message(stream, seq, item)
            if not taking() or not send(out, message, stop, tend if redispatch else None):
                break
            stats.sent += 1
            report()
            if redispatch is not None:
                redispatch.add(seq, message)
                tend()
        stats.missed = source.missed
        last = wire.encode_eos(stream, stats.sent, stats.dropped + stats.missed)  # `end` is the Ctrl-C event
        eos.send_multipart(last)  # even after a stop: the sink learns how many frames were sent
        if redispatch is not None:  # until the sink has a verdict for every frame
            last_eos = time.monotonic()
            while not stop.is_set() and not (redispatch.done and not redispatch.waiting):
                tend()
                # the eos repeats while frames may still be sent: it keeps the sink from declaring them
                # lost. Once the sink holds all that is left (behind frames abandoned), it stops, so the
                # sink's drain timeout declares the abandoned ones lost and logs the rest.
                if redispatch.sending and time.monotonic() - last_eos > 1.0:
                    send(eos, last, stop)
                    last_eos = time.monotonic()
                if not redispatch.waiting and redispatch.done:
                    break
                stop.wait(0.05)
        # Stay connected: when a sender closes, ZeroMQ drops what the receiver had not yet taken
        # off the connection (its queue was full), so the last frames would be lost.
        report()
        stop.wait(hold)
    finally:
        report()
        metrics.close()
        source.close()
        if curve:
            curve.close()
        # after a stop nothing in flight is wanted; otherwise give a slow receiver a moment, never forever
        out.close(linger=0 if stop.is_set() else 1000)
        eos.close(linger=0 if stop.is_set() else 5000)
        if redispatch is not None:
            redispatch.acks.close()
        ctx.term()
    return stats


def _message(stream: str, seq: int, item: SourceFrame) -> list:
    meta = dict(item.meta)
    try:
        if item.encoded is not None:
            return wire.encode_frame_encoded(stream, seq, item.encoded, item.shape, item.encoding, meta=meta)
        if item.pixels is not None:
            return wire.encode_frame(stream, seq, item.pixels, meta=meta)
        error = item.error or "the source could not read this frame"
    except wire.WireError as exc:  # beyond what the wire carries (a side over its limit): this frame's error
        error = f"{meta.get('file', 'frame')}: {exc}"
    # unreadable source frame: still sent, so it ends as an error result
    return wire.encode_frame(stream, seq, np.zeros((1, 1, 1), np.uint8), meta=meta, error=error)


def _live_frames(source: Source, ring: int, stats: ProducerStats, taking: Callable[[], bool]) -> Iterator[SourceFrame]:
    """Frames from a capture thread that never waits for the sender: the oldest is dropped when the ring is
    full; the thread stops capturing once `taking()` is False."""
    frames: collections.deque = collections.deque()
    cond = threading.Condition()
    done = threading.Event()

    def capture():
        try:
            for item in source:
                with cond:
                    if len(frames) >= ring:
                        frames.popleft()
                        stats.dropped += 1
                    frames.append(item)
                    cond.notify()
                if not taking():
                    break
        finally:
            with cond:
                done.set()
                cond.notify()

    thread = threading.Thread(target=capture, name="capture", daemon=True)
    thread.start()
    while True:
        with cond:
            while not frames and not done.is_set() and taking():
                cond.wait(0.1)
            if not frames and (done.is_set() or not taking()):  # ended while the source sends nothing (a
                break  # stalled camera, one waiting for its trigger): the stream ends now all the same
            item = frames.popleft()
        yield item
    thread.join(timeout=1.0)
