"""Frame sources and produce(): what each source yields, and delivery over ZeroMQ in both modes.

Every socket lives in the thread that uses it: produce() runs in a thread with its own Context, the
test side has one Context for its sockets (all with timeouts, closed at teardown). Synchronisation
is by handshakes, events and polls with timeouts; every thread is joined with a timeout.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from plumbing import Background, Net

from calibration.synthetic import DEFECT_TYPES
from engines.errors import ConfigError
from pipeline import wire
from pipeline.producers import (
    SOURCES,
    FolderSource,
    ProducerStats,
    Source,
    SourceError,
    SourceFrame,
    SyntheticSource,
    VideoSource,
    check_source,
    open_source,
    parse_source,
    produce,
)

TIMEOUT_S = 10.0  # the most any step may take before the test fails instead of hanging


# ---- test-side plumbing ----


def stop_producer(run: Background, stop: threading.Event, net: Net, grace: float = 2.0) -> None:
    """Set stop and join; a producer still stuck after `grace` s (on its sockets' linger) is freed by closing
    the test's sockets, so a failing test reports instead of hanging. Asserts the thread ended."""
    stop.set()
    run.thread.join(grace)
    if run.thread.is_alive():
        net.close()
        run.thread.join(TIMEOUT_S)
    assert not run.thread.is_alive(), "producer thread did not end"


def receive(frames_sock: zmq.Socket, sink_sock: zmq.Socket) -> tuple[list[wire.Frame], wire.Eos]:
    """Decoded frames from frames_sock and the Eos from sink_sock, until the eos and its `count` frames came."""
    poller = zmq.Poller()
    poller.register(frames_sock, zmq.POLLIN)
    poller.register(sink_sock, zmq.POLLIN)
    frames: list[wire.Frame] = []
    eos = None
    deadline = time.monotonic() + TIMEOUT_S
    while eos is None or len(frames) < eos.count:
        assert time.monotonic() < deadline, f"got {len(frames)} frames and eos {eos} within {TIMEOUT_S} s"
        for sock, _ in poller.poll(100):
            message = wire.decode(sock.recv_multipart(copy=False))
            if sock is sink_sock:
                assert isinstance(message, wire.Eos) and eos is None
                eos = message
            else:
                assert isinstance(message, wire.Frame)
                frames.append(message)
    return frames, eos


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an RGB / RGBA / grey image (uint8 or uint16) with OpenCV, which wants BGR order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), image)
    return path


def rgb(h: int, w: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, top, (h, w, 3), endpoint=True).astype(dtype)


class ListSource(Source):
    """Frames from a list; sets `done` once the last one has been handed out."""

    def __init__(self, frames: list[SourceFrame], live: bool = False):
        self.frames = frames
        self.live = live
        self.yielded = 0
        self.done = threading.Event()
        self.closed = False

    def __iter__(self):
        for item in self.frames:
            self.yielded += 1
            yield item
        self.done.set()

    def close(self) -> None:
        self.closed = True


# ---- FolderSource ----

@pytest.fixture
def mixed_folder(tmp_path) -> dict:
    """One file of each kind the folder source treats differently; returns name -> what it holds."""
    folder = tmp_path / "images"
    files = {
        "a.jpg": rgb(30, 40, 1),
        "b.png": rgb(20, 25, 2),
        "c_grey.png": np.random.default_rng(3).integers(0, 255, (10, 12), endpoint=True).astype(np.uint8),
        "d.bmp": rgb(6, 7, 4),
        "e16.png": rgb(8, 9, 5, np.uint16),
    }
    for name, image in files.items():
        write_image(folder / name, image)
    (folder / "f_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    (folder / "notes.txt").write_text("not an image")
    return {"folder": folder, **files}


def test_folder_source_sends_jpeg_and_png_files_as_they_are(mixed_folder):
    folder = mixed_folder["folder"]
    items = {item.meta["file"]: item for item in FolderSource(folder)}
    assert sorted(items) == ["a.jpg", "b.png", "c_grey.png", "d.bmp", "e16.png", "f_bad.png"]  # notes.txt ignored
    for name, encoding, shape in [("a.jpg", "jpeg", (30, 40, 3)), ("b.png", "png", (20, 25, 3)),
                                  ("c_grey.png", "png", (10, 12, 1))]:
        item = items[name]
        assert item.encoding == encoding and item.pixels is None
        assert item.encoded == (folder / name).read_bytes()  # the file itself, not re-encoded
        assert item.shape == shape  # from the file header: a grey file is declared grey
        assert item.meta == {"file": name}
    # the receiver decodes the declared shape: RGB, or the grey file's one channel
    b = wire.decode(wire.encode_frame_encoded("s", 0, items["b.png"].encoded, items["b.png"].shape, "png"))
    np.testing.assert_array_equal(b.image(), mixed_folder["b.png"])
    grey = items["c_grey.png"]
    frame = wire.decode(wire.encode_frame_encoded("s", 0, grey.encoded, grey.shape, grey.encoding))
    np.testing.assert_array_equal(frame.image(), mixed_folder["c_grey.png"][:, :, None])


def test_folder_source_decodes_bmp_and_16_bit_png_and_sends_them_raw_as_they_are(mixed_folder):
    items = {item.meta["file"]: item for item in FolderSource(mixed_folder["folder"])}
    bmp = items["d.bmp"]
    assert bmp.encoding == "raw" and bmp.encoded is None and bmp.meta == {"file": "d.bmp"}
    assert bmp.pixels.dtype == np.uint8 and bmp.pixels.shape == (6, 7, 3)
    np.testing.assert_array_equal(bmp.pixels, mixed_folder["d.bmp"])  # RGB order, lossless
    deep = items["e16.png"]
    assert deep.encoding == "raw" and deep.encoded is None
    assert deep.pixels.dtype == np.uint16 and deep.pixels.shape == (8, 9, 3)  # the worker scales it by the
    np.testing.assert_array_equal(deep.pixels, mixed_folder["e16.png"])  # model's bit depth


def test_folder_source_reports_a_corrupt_file_as_an_error_frame(mixed_folder):
    items = {item.meta["file"]: item for item in FolderSource(mixed_folder["folder"])}
    bad = items["f_bad.png"]
    assert bad.pixels is None and bad.encoded is None
    assert "f_bad.png" in bad.error and bad.meta == {"file": "f_bad.png"}  # meta stays the user's


def test_a_file_gone_or_a_frame_beyond_the_wire_is_that_frames_error_not_the_lines_end(tmp_path):
    """A file removed after the folder was listed, and a frame with a side past the wire's limit (a
    line-scan image): each becomes an error frame naming the file; the frames after it go on."""
    from pipeline.producers import _message

    folder = tmp_path / "frames"
    for name in ("a.png", "b.png", "c.png"):
        write_image(folder / name, rgb(4, 5, 1))
    frames = iter(FolderSource(folder))
    first = next(frames)
    (folder / "b.png").unlink()
    gone, last = next(frames), next(frames)
    assert first.error is None and last.error is None and last.meta == {"file": "c.png"}
    assert gone.error.startswith("b.png: cannot be read") and gone.meta == {"file": "b.png"}
    assert [f.meta["file"] for f in open_source(str(folder), frames=1)] == ["a.png"]  # --frames bounds a folder too
    wide = SourceFrame(pixels=np.zeros((2, wire.MAX_SIDE + 1, 3), np.uint8), meta={"file": "scan.png"})
    frame = wire.decode(_message("cam0", 7, wide))
    assert frame.seq == 7 and frame.error.startswith("scan.png:") and frame.meta == {"file": "scan.png"}


def test_folder_source_recurses_in_sorted_order_and_repeats(tmp_path):
    folder = tmp_path / "tree"
    names = ["sub/deeper/d.jpg", "b.png", "sub/c.png", "a.png", "E.PNG"]
    for i, name in enumerate(names):
        write_image(folder / name, rgb(4, 5, i))
    (folder / "sub" / "readme.md").write_text("skip me")
    source = FolderSource(folder, repeat=2)
    order = ["E.PNG", "a.png", "b.png", "sub/c.png", "sub/deeper/d.jpg"]
    assert [item.meta["file"] for item in source] == order * 2
    assert [item.encoding for item in source][:5] == ["png", "png", "png", "png", "jpeg"]


def test_folder_source_missing_or_empty_folder_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        FolderSource(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match="holds no images"):
        FolderSource(empty)


# ---- VideoSource ----

@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """10 MJPG frames, 64 x 48: red 200, green 20 * i, blue 0 (RGB)."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(10):
        writer.write(np.full((48, 64, 3), (0, 20 * i, 200), np.uint8))  # BGR
    writer.release()
    return path


def test_video_source_yields_every_frame_as_rgb(video):
    source = VideoSource(str(video), live=False)
    try:
        items = list(source)
    finally:
        source.close()
    assert not source.live and len(items) == 10
    for i, item in enumerate(items):
        assert item.encoding == "raw" and item.meta == {"frame": i}
        assert item.pixels.dtype == np.uint8 and item.pixels.shape == (48, 64, 3)
        mean = item.pixels.reshape(-1, 3).mean(axis=0)  # MJPG is lossy: colours within a few levels
        np.testing.assert_allclose(mean, (200, 20 * i, 0), atol=8)


def test_video_source_limit(video):
    source = VideoSource(str(video), live=False, limit=4)
    try:
        assert [item.meta["frame"] for item in source] == [0, 1, 2, 3]
    finally:
        source.close()


def test_a_video_file_cut_short_counts_the_frames_it_lacks(tmp_path, caplog):
    """A file whose container promises 200 frames but holds about half (copied while it was being
    written, damaged): those are read, the rest are missed (the eos's dropped count) with a warning, not
    a quiet end."""
    whole = tmp_path / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(200):
        writer.write(np.full((48, 64, 3), i % 256, np.uint8))
    writer.release()
    data = whole.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) // 2])
    source = VideoSource(str(cut), live=False)
    with caplog.at_level("WARNING", "lineguard.producer"):
        got = len(list(source))
    source.close()
    assert 0 < got < 200 and source.missed == 200 - got
    assert f"read {got} of the 200 frames its container gives" in caplog.text


def test_a_camera_that_stops_delivering_is_reopened(monkeypatch):
    """A camera or RTSP stream whose read fails (a network hiccup, a replug) is opened again and read on."""
    from pipeline import producers

    class Capture:
        opened = 0

        def __init__(self, target):  # two frames, a failed read; reopened: two more; then it is gone
            Capture.opened += 1
            self.reads = [True, True, False] if Capture.opened == 1 else [True, True]
            self.ok = Capture.opened <= 2

        def isOpened(self):
            return self.ok

        def read(self):
            ok = self.reads.pop(0) if self.reads else False
            return ok, np.zeros((4, 4, 3), np.uint8) if ok else None

        def release(self):
            pass

    monkeypatch.setattr(producers.cv2, "VideoCapture", Capture)
    monkeypatch.setattr(producers.time, "sleep", lambda s: None)
    source = VideoSource("rtsp://camera/stream", live=True, give_up_s=0.05)
    assert len(list(source)) == 4 and source.reconnects == 1  # then it gave up: the stream ends


def test_video_source_missing_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="missing.avi"):
        VideoSource(str(tmp_path / "missing.avi"), live=False)


def test_live_video_source_through_produce(video, net):
    """The camera path: a live VideoSource (the video file as a fake device) sent in live mode."""
    source = VideoSource(str(video), live=True)
    assert source.live
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, stream="camA", mode="live", stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        frames, eos = receive(pull, sink)
        stop.set()  # every frame is in: let the producer close its sockets
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    assert stats.sent + stats.dropped == 10
    assert eos == wire.Eos("camA", stats.sent, stats.dropped)
    assert [f.seq for f in frames] == list(range(stats.sent))
    numbers = [f.meta["frame"] for f in frames]
    assert numbers == sorted(numbers) and numbers[-1] == 9  # only older frames are ever dropped
    for f in frames:
        assert (f.stream, f.shape, f.dtype, f.encoding) == ("camA", (48, 64, 3), "uint8", "raw")
        assert abs(int(f.image()[..., 0].mean()) - 200) <= 8  # RGB order on the wire


# ---- open_source ----

def test_open_source_picks_the_source_for_a_spec(tmp_path, video):
    synthetic = open_source("synthetic", frames=3, size=32, seed=1)
    assert isinstance(synthetic, SyntheticSource) and synthetic.frames == 3
    assert [item.pixels.shape for item in synthetic] == [(32, 32, 3)] * 3
    assert open_source("synthetic", size=32).frames == 300  # frames=0: the default length

    folder = tmp_path / "folder"
    write_image(folder / "x.png", rgb(4, 4))
    source = open_source(str(folder))
    assert isinstance(source, FolderSource) and [i.meta["file"] for i in source] == ["x.png"]

    video_source = open_source(str(video), frames=2)
    try:
        assert isinstance(video_source, VideoSource) and not video_source.live
        assert len(list(video_source)) == 2
    finally:
        video_source.close()


@pytest.mark.parametrize("spec", ["camera:x", "camera:", "camera:-1", "camera:0.5"])
def test_open_source_camera_needs_a_device_index(spec):
    with pytest.raises(ConfigError, match="camera:N"):
        open_source(spec)


def test_open_source_unknown_path_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "no-such-thing"))
    with pytest.raises(SourceError, match="not found"):
        check_source(str(tmp_path / "no-such-thing"))


def test_one_registry_parses_a_spec_for_check_and_open(tmp_path, video):
    """Every source kind is picked by parse_source; check_source raises what open_source would, opening nothing."""
    folder = tmp_path / "folder"
    write_image(folder / "x.png", rgb(4, 4))
    specs = {"synthetic": "synthetic", "camera": "camera:3", "genicam": "genicam:SN42", "stream": "rtsp://host/line",
             "folder": str(folder), "video": str(video)}
    assert sorted(specs) == sorted(kind.name for kind in SOURCES)
    for name, spec in specs.items():
        kind, _ = parse_source(spec)
        assert kind.name == name
        check_source(spec)  # camera 3, the GenICam camera and the URL are not opened here
    with pytest.raises(ConfigError, match="camera:N"):
        check_source("camera:x")


# ---- SyntheticSource ----

def test_synthetic_source_is_deterministic_and_plants_defects():
    a = list(SyntheticSource(60, size=32, seed=3))
    b = list(SyntheticSource(60, size=32, seed=3))
    c = list(SyntheticSource(60, size=32, seed=4))
    assert len(a) == 60
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pixels, y.pixels)
        assert x.meta == y.meta
    assert any(not np.array_equal(x.pixels, z.pixels) for x, z in zip(a, c))
    assert all(item.pixels.shape == (32, 32, 3) and item.pixels.dtype == np.uint8 for item in a)
    planted = [item.meta["planted"] for item in a if item.meta]
    assert planted and len(planted) < len(a)  # some, not all, at the default rate of 0.25
    assert set(planted) <= set(DEFECT_TYPES) and all(set(item.meta) <= {"planted"} for item in a)
    for i in range(60 - 48):  # the default pool of 48 is cycled
        np.testing.assert_array_equal(a[i].pixels, a[i + 48].pixels)


def test_synthetic_source_defect_rate():
    assert not any(item.meta for item in SyntheticSource(8, size=32, defect_rate=0.0, pool=8))
    assert all(item.meta["planted"] in DEFECT_TYPES for item in SyntheticSource(8, size=32, defect_rate=1.0, pool=8))
    assert list(SyntheticSource(0, size=32, pool=2)) == []
    with pytest.raises(ConfigError, match="defect rate"):
        SyntheticSource(8, size=32, defect_rate=1.5)


# ---- produce ----

def test_produce_sends_every_frame_in_order_then_eos(mixed_folder, net):
    folder = mixed_folder["folder"]
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)  # produce connects to the sink...
    stop = threading.Event()
    run = Background(produce, FolderSource(folder), frames_ep, sink_ep, stream="line1", stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)  # ...and binds the frames endpoint
        frames, eos = receive(pull, sink)
        stop.set()  # every frame is in: let the producer close its sockets
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    names = ["a.jpg", "b.png", "c_grey.png", "d.bmp", "e16.png", "f_bad.png"]
    assert stats == ProducerStats(sent=6, dropped=0)
    assert eos == wire.Eos("line1", 6, 0)
    assert [f.seq for f in frames] == list(range(6)) and {f.stream for f in frames} == {"line1"}
    assert [f.meta["file"] for f in frames] == names
    assert [f.encoding for f in frames] == ["jpeg", "png", "png", "raw", "raw", "raw"]
    assert all(0 < f.t_ns <= time.time_ns() for f in frames)
    assert bytes(frames[0].payload) == (folder / "a.jpg").read_bytes()
    np.testing.assert_array_equal(frames[1].image(), mixed_folder["b.png"])
    np.testing.assert_array_equal(frames[3].image(), mixed_folder["d.bmp"])
    bad = frames[5]  # an unreadable file still goes out, to end as an error result
    assert bad.shape == (1, 1, 1) and "f_bad.png" in bad.error and "error" not in bad.meta


def test_produce_closes_by_itself_hold_seconds_after_the_end(net):
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    source = ListSource([SourceFrame(pixels=np.zeros((4, 4, 3), np.uint8)) for _ in range(2)])
    stop = threading.Event()  # set only if the test fails: otherwise `hold` alone ends produce
    run = Background(produce, source, frames_ep, sink_ep, hold=0.1, stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        frames, eos = receive(pull, sink)
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    assert stats == ProducerStats(sent=2) and eos.count == 2 and len(frames) == 2 and source.closed


def test_produce_rejects_an_unknown_mode(net):
    with pytest.raises(ConfigError, match="unknown mode"):
        produce(ListSource([]), net.endpoint("frames"), net.endpoint("sink"), mode="fast")


def test_lossless_produce_blocks_on_backpressure_and_drops_nothing(net):
    """With high-water marks of 1 and a receiver that reads nothing, the source is read no further
    than the queues hold; once the receiver reads, every frame arrives."""
    n = 24
    big = [SourceFrame(pixels=np.full((256, 256, 3), i, np.uint8), meta={"i": i}) for i in range(n)]
    source = ListSource(big)
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, mode="lossless", hwm=1, stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep, hwm=1)
        # nobody reads: the producer must stall long before the 24 x 196 kB are out
        assert not source.done.wait(0.3)
        assert source.yielded < n // 2
        frames, eos = receive(pull, sink)
        stop.set()  # every frame is in: let the producer close its sockets
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    assert source.done.is_set() and source.closed
    assert stats.sent == n and stats.dropped == 0
    assert eos == wire.Eos("cam0", n, 0)
    assert [f.seq for f in frames] == list(range(n))
    assert [int(f.image()[0, 0, 0]) for f in frames] == list(range(n))


def test_live_produce_drops_the_oldest_frames_and_reports_them(net):
    """A live source faster than its receiver: frames wait in a ring of 4, the oldest dropped and counted."""
    n, ring = 200, 4
    source = ListSource([SourceFrame(pixels=np.full((8, 8, 3), i % 256, np.uint8), meta={"i": i})
                         for i in range(n)], live=True)
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, ring=ring, stop=stop)  # mode from source.live
    try:
        assert source.done.wait(TIMEOUT_S)  # the camera ran through every frame before anyone read one
        pull = net.socket(zmq.PULL, connect=frames_ep)
        frames, eos = receive(pull, sink)
        stop.set()  # every frame is in: let the producer close its sockets
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    assert stats.dropped > 0 and stats.sent + stats.dropped == n
    assert stats.sent <= ring + 1  # the ring, and the one frame the sender held
    assert eos == wire.Eos("cam0", stats.sent, stats.dropped)
    assert [f.seq for f in frames] == list(range(stats.sent))
    numbers = [f.meta["i"] for f in frames]
    assert numbers == sorted(numbers) and numbers[-1] == n - 1  # the newest frame is never the one dropped


def endless(shape=(16, 16, 3)):
    class Endless(Source):
        def __init__(self):
            self.started = threading.Event()  # asked for a first frame
            self.asked_again = threading.Event()  # asked for a second one
            self.yielded = 0

        def __iter__(self):
            while True:  # asked_again: set on every request after the first
                (self.asked_again if self.started.is_set() else self.started).set()
                self.yielded += 1
                yield SourceFrame(pixels=np.full(shape, self.yielded % 256, np.uint8))

    return Endless()


def test_stop_ends_produce_promptly(net):
    source = endless()
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        received = [wire.decode(pull.recv_multipart(copy=False)) for _ in range(3)]
        stop.set()
        t_stop = time.monotonic()
        while run.thread.is_alive() and time.monotonic() - t_stop < TIMEOUT_S:  # keep reading what is queued
            if pull.poll(50):
                received.append(wire.decode(pull.recv_multipart(copy=False)))
        stats = run.finish()
        assert time.monotonic() - t_stop < 2.0
        while pull.poll(50):
            received.append(wire.decode(pull.recv_multipart(copy=False)))
        assert sink.poll(int(TIMEOUT_S * 1000))
        eos = wire.decode(sink.recv_multipart())
    finally:
        stop_producer(run, stop, net)
    assert eos == wire.Eos("cam0", stats.sent, 0)
    assert 3 <= len(received) <= stats.sent
    assert [f.seq for f in received] == list(range(len(received)))


@pytest.mark.parametrize("live", [False, True])
def test_end_takes_no_more_frames_and_ends_the_stream_with_those_sent(net, live):
    """Ctrl-C on a camera (`end`): the producer takes no new frame, its eos counts the frames it sent, and
    every one of them arrives; a live source's capture thread stops asking the camera for frames."""

    class Camera(Source):
        def __init__(self):
            self.live, self.yielded = live, 0

        def __iter__(self):
            while True:
                time.sleep(0.005)  # a camera's frame rate
                self.yielded += 1
                yield SourceFrame(pixels=np.full((8, 8, 3), self.yielded % 256, np.uint8))

    source = Camera()
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop, end = threading.Event(), threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, stop=stop, end=end, hold=0)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        first = [wire.decode(pull.recv_multipart(copy=False)) for _ in range(5)]
        end.set()
        assert sink.poll(int(TIMEOUT_S * 1000))
        eos = wire.decode(sink.recv_multipart())
        frames = []
        while len(first) + len(frames) < eos.count:
            assert pull.poll(int(TIMEOUT_S * 1000)), f"{len(first) + len(frames)} of {eos.count} frames came"
            frames.append(wire.decode(pull.recv_multipart(copy=False)))
        stats = run.finish()
        taken = source.yielded
        time.sleep(0.1)
        assert source.yielded <= taken + 1  # nothing more asked of the camera (a capture in progress may finish)
    finally:
        stop_producer(run, stop, net)
    assert eos == wire.Eos("cam0", stats.sent, stats.dropped) and stats.sent >= 5
    assert [f.seq for f in first + frames] == list(range(stats.sent))


def test_end_ends_a_live_stream_whose_camera_sends_nothing(net, monkeypatch):
    """Ctrl-C while the camera sends nothing (stalled, or waiting for a trigger that does not come): the
    stream ends at once with the frames sent; a frame the camera delivers after that is left, no error."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    trigger = threading.Event()

    class Camera(Source):
        live = True

        def __iter__(self):
            for i in range(3):
                yield SourceFrame(pixels=np.full((8, 8, 3), i, np.uint8))
            trigger.wait(TIMEOUT_S)
            yield SourceFrame(pixels=np.zeros((8, 8, 3), np.uint8))

    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop, end = threading.Event(), threading.Event()
    run = Background(produce, Camera(), frames_ep, sink_ep, stop=stop, end=end, hold=0)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        frames = [wire.decode(pull.recv_multipart(copy=False)) for _ in range(3)]
        (capture,) = [t for t in threading.enumerate() if t.name == "capture"]
        end.set()
        assert sink.poll(5000), "the stream did not end while its camera sent nothing"
        eos = wire.decode(sink.recv_multipart())
        trigger.set()  # the camera delivers one more frame: the capture thread sees the end and stops
        capture.join(TIMEOUT_S)
        stats = run.finish()
    finally:
        trigger.set()
        stop_producer(run, stop, net)
    assert eos == wire.Eos("cam0", 3, 0) and stats.sent == 3 and [f.seq for f in frames] == [0, 1, 2]
    assert not capture.is_alive() and errors == []


def test_stop_ends_produce_promptly_while_its_consumer_stalls(net):
    source = endless((256, 256, 3))
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    net.socket(zmq.PULL, bind=sink_ep)  # the eos end exists; nobody reads it
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, hwm=1, stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep, hwm=1)
        pull.recv_multipart()  # connected and flowing; from now on nobody reads
        while source.asked_again.wait(0.3):  # until the producer has stalled on a full queue
            source.asked_again.clear()
        stop.set()
        run.thread.join(2.0)
        assert not run.thread.is_alive(), "produce still running 2 s after stop"
    finally:
        stop_producer(run, stop, net, grace=0.0)


def test_stop_while_blocked_counts_only_frames_sent(net):
    source = endless()
    frames_ep, sink_ep = net.endpoint("frames"), net.endpoint("sink")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, stop=stop)  # nobody connects to frames_ep
    try:
        assert source.started.wait(TIMEOUT_S)
        # frame 0 is in the producer's hands; with no receiver it blocks there and asks for no second one
        assert not source.asked_again.wait(0.3) and source.yielded == 1
        stop.set()
        stats = run.finish()
        assert sink.poll(int(TIMEOUT_S * 1000))
        eos = wire.decode(sink.recv_multipart())
    finally:
        stop_producer(run, stop, net)
    assert eos == wire.Eos("cam0", 0, 0) and stats.sent == 0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_redispatch_backs_off_doubling_each_wait_then_abandons(monkeypatch):
    """The n-th send waits retry_after * 2**(n-1) for a verdict; after `attempts` sends the frame is abandoned."""
    from pipeline import producers

    clock = FakeClock()
    monkeypatch.setattr(producers.time, "monotonic", clock)
    stats = ProducerStats()
    redispatch = producers.Redispatch(None, stats, retry_after=2.0, window=8, attempts=4)
    redispatch.add(0, ["frame 0"])
    sends_at = [clock.now]
    while 0 in redispatch.waiting:
        clock.now += 0.25
        for seq in redispatch.overdue():
            assert seq == 0
            redispatch.resent(seq)
            sends_at.append(clock.now)
    gaps = [b - a for a, b in zip(sends_at, sends_at[1:])]
    assert gaps == [2.0, 4.0, 8.0]
    assert clock.now - sends_at[-1] == 16.0  # the last send waited twice as long again, then gave up
    assert stats.resent == 3 and stats.abandoned == 1


def test_redispatch_window_bounds_the_frames_in_flight():
    stats = ProducerStats()
    from pipeline.producers import Redispatch

    redispatch = Redispatch(None, stats, retry_after=10.0, window=3)
    for seq in range(3):
        assert not redispatch.full
        redispatch.add(seq, [f"frame {seq}"])
    assert redispatch.full
    assert redispatch.overdue() == []


class QueuedAcks:
    """The acks socket of a Redispatch, fed by the test."""

    def __init__(self):
        self.queue: list[list] = []

    def poll(self, timeout: int = 0) -> bool:
        return bool(self.queue)

    def recv_multipart(self) -> list:
        return self.queue.pop(0)


def test_redispatch_keeps_what_the_sink_holds_unlogged_and_sends_it_again_once_no_ack_names_it(monkeypatch):
    """Results waiting behind a gap at the sink are not logged: the producer keeps those frames, out
    of its window and not re-sent while the sink's acks say it holds them; a restarted sink (whose
    acks do not name them) gets them again after retry_after."""
    from pipeline import producers

    clock = FakeClock()
    monkeypatch.setattr(producers.time, "monotonic", clock)
    acks = QueuedAcks()
    redispatch = producers.Redispatch(acks, ProducerStats(), retry_after=2.0, window=3)
    for seq in range(3):
        redispatch.add(seq, [f"frame {seq}"])
    assert redispatch.full
    holding = wire.encode_ack("cam0", 0, [], False, held=[1, 2])
    acks.queue.append(holding)
    redispatch.poll("cam0")
    assert sorted(redispatch.waiting) == [0, 1, 2] and not redispatch.full  # kept, outside the window
    clock.now += 2.0
    acks.queue.append(holding)
    redispatch.poll("cam0")
    assert redispatch.overdue() == [0]  # the held frames' wait began again with the ack
    redispatch.resent(0)
    clock.now += 2.0  # no ack names them any more: the sink died
    assert sorted(redispatch.overdue()) == [1, 2]
    acks.queue.append(wire.encode_ack("cam0", 0, [], False))  # the restarted sink holds nothing
    redispatch.poll("cam0")
    assert redispatch.full
    acks.queue.append(wire.encode_ack("cam0", 3, [], False))
    redispatch.poll("cam0")
    assert redispatch.waiting == {} and redispatch.held == set()


def test_produce_goes_quiet_once_the_sink_holds_all_that_is_left(net):
    """Frame 0 never gets a verdict and is abandoned; the sink holds frames 1 and 2 behind it. The
    producer must stop repeating its eos then, so the sink's drain timeout can declare 0 lost and
    log 1 and 2: an eos repeated for ever would keep the sink, and the run, waiting for ever."""
    source = ListSource([SourceFrame(pixels=np.full((8, 8, 3), i, np.uint8)) for i in range(3)])
    frames_ep, sink_ep, acks_ep = net.endpoint("frames"), net.endpoint("sink"), net.endpoint("acks")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    acks = net.socket(zmq.PUB, bind=acks_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, mode="lossless", acks_endpoint=acks_ep,
                     retry_after=0.05, window=8, hold=0, stop=stop)
    pull = net.socket(zmq.PULL, connect=frames_ep)  # takes the frames and their resends
    holding = wire.encode_ack("cam0", 0, [], False, held=[1, 2])
    eos_at: list[float] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline and not (eos_at and time.monotonic() - eos_at[-1] > 3.0):
            acks.send_multipart(holding)
            while pull.poll(0):
                pull.recv_multipart()
            while sink.poll(0):
                assert isinstance(wire.decode(sink.recv_multipart()), wire.Eos)
                eos_at.append(time.monotonic())
            time.sleep(0.05)
        assert eos_at and time.monotonic() - eos_at[-1] > 3.0, "the producer went on repeating its eos"
        while run.thread.is_alive() and time.monotonic() < deadline:  # the sink drained: 0 lost, 1 and 2 logged
            acks.send_multipart(wire.encode_ack("cam0", 3, [], True))
            time.sleep(0.05)
        stats = run.finish()
    finally:
        stop_producer(run, stop, net)
    assert stats.abandoned == 1 and stats.sent == 3


def test_produce_holds_the_source_at_the_window_until_verdicts_come(net):
    """With acks and nobody acknowledging, exactly `window` frames go out; each ack lets as many more through."""
    n, window = 40, 6
    source = ListSource([SourceFrame(pixels=np.full((8, 8, 3), i, np.uint8)) for i in range(n)])
    frames_ep, sink_ep, acks_ep = net.endpoint("frames"), net.endpoint("sink"), net.endpoint("acks")
    net.socket(zmq.PULL, bind=sink_ep)
    acks = net.socket(zmq.PUB, bind=acks_ep)
    stop = threading.Event()
    run = Background(produce, source, frames_ep, sink_ep, mode="lossless", acks_endpoint=acks_ep,
                     retry_after=60.0, window=window, stop=stop)
    try:
        pull = net.socket(zmq.PULL, connect=frames_ep)
        got = [wire.decode(pull.recv_multipart(copy=False)).seq for _ in range(window)]
        assert not pull.poll(500)  # the window is full: nothing more until a verdict
        deadline = time.monotonic() + TIMEOUT_S
        while not pull.poll(50):  # PUB drops what it sends before the SUB has joined: repeat the ack
            assert time.monotonic() < deadline
            acks.send_multipart(wire.encode_ack("cam0", 2, [], False))
        got += [wire.decode(pull.recv_multipart(copy=False)).seq for _ in range(2)]
        assert not pull.poll(500)
    finally:
        stop_producer(run, stop, net)
    assert got == list(range(window + 2))
