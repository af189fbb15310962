"""Workers: dynamic batching (_collect), the inference worker against every kind of malformed message, and
the postprocess worker (verdicts, regions, defect maps, overlays, pass-through of error results).

Each worker runs in a thread with its own Context and a stop Event; the test's sockets are bound at ipc
endpoints under tmp_path, wait for the worker's 'ready' on a control socket, and use timeouts throughout.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from calibration.synthetic import normal_frame
from pipeline import wire
from pipeline.workers import _collect, inference_worker, postprocess_worker
from plumbing import Background, Net

TIMEOUT_S = 30.0  # the most any step may take before the test fails instead of hanging


# ---- test-side plumbing ----


def wait_ready(control: zmq.Socket, run: Background) -> None:
    """The worker's 'ready' handshake (or the exception that kept it from starting)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not control.poll(100):
        if not run.thread.is_alive():
            run.finish()  # raises what the worker died of
            raise AssertionError("worker ended before it was ready")
        assert time.monotonic() < deadline, "worker sent no 'ready'"
    message = wire.decode(control.recv_multipart())
    assert isinstance(message, wire.Control) and message.event == "ready"


def receive_until(sock: zmq.Socket, last: tuple[str, int]) -> list:
    """Decoded messages until the one for (stream, seq) `last`: a sentinel sent after everything else, on
    the same ordered path, so whatever the worker emits for earlier input has come before it."""
    out = []
    deadline = time.monotonic() + TIMEOUT_S
    while not out or _key(out[-1]) != last:
        assert time.monotonic() < deadline, f"no result for {last} within {TIMEOUT_S} s; got {[_key(m) for m in out]}"
        if sock.poll(100):
            out.append(wire.decode(sock.recv_multipart(copy=False)))
    return out


def _key(message) -> tuple[str, int]:
    return message.stream, message.seq


def frame_header(seq: int, **changes) -> bytes:
    """A packed version-1 frame header for cam0 / seq, t_ns 123, shape [4, 5, 3] uint8 raw, fields changed."""
    header = {"v": 1, "kind": "frame", "stream": "cam0", "seq": seq, "t_ns": 123, "shape": [4, 5, 3],
              "dtype": "uint8", "encoding": "raw", "product": None, "meta": {}}
    return msgpack.packb({**header, **changes})


def png_bytes(image_rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def decoded(message: list) -> wire.Frame:
    """A wire.Frame as a receiver sees it (for building scored messages)."""
    return wire.decode([bytes(part) for part in message])


# ---- _collect ----

@pytest.fixture
def pipe(net):
    """(push, pull) over inproc in the test's one Context; both used in this thread only."""
    pull = net.socket(zmq.PULL, bind="inproc://collect")
    push = net.socket(zmq.PUSH, connect="inproc://collect")
    return push, pull


def test_collect_returns_at_most_batch_messages(pipe):
    push, pull = pipe
    for i in range(5):
        push.send(b"%d" % i)
    stop = threading.Event()
    first = _collect(pull, 3, 50.0, stop)
    assert [m[0].bytes for m in first] == [b"0", b"1", b"2"]
    rest = _collect(pull, 3, 0.0, stop)  # batch_ms 0: whatever is queued, no waiting
    assert [m[0].bytes for m in rest] == [b"3", b"4"]


def test_collect_returns_fewer_after_batch_ms(pipe):
    push, pull = pipe
    push.send(b"a")
    push.send_multipart([b"b", b"payload"])
    t0 = time.perf_counter()
    got = _collect(pull, 8, 30.0, threading.Event())
    elapsed = time.perf_counter() - t0
    assert [[f.bytes for f in m] for m in got] == [[b"a"], [b"b", b"payload"]]
    assert 0.025 <= elapsed < 1.0  # waited about batch_ms for more (poll rounds down to whole ms), then gave up


def test_collect_returns_nothing_once_stopped(pipe):
    push, pull = pipe
    stop = threading.Event()
    stop.set()
    push.send(b"queued")
    assert _collect(pull, 4, 10.0, stop) == []
    assert pull.poll(0)  # left for whoever reads next

    assert len(_collect(pull, 4, 0.0, threading.Event())) == 1  # empty the socket
    stop_later = threading.Event()
    timer = threading.Timer(0.05, stop_later.set)  # stops a _collect that waits on an empty socket
    timer.start()
    try:
        t0 = time.perf_counter()
        assert _collect(pull, 4, 10.0, stop_later) == []
        assert time.perf_counter() - t0 < 1.0
    finally:
        timer.join(TIMEOUT_S)
        assert not timer.is_alive()


# ---- inference worker ----

@pytest.fixture
def inspector(fitted_model):
    """The fitted model's Inspector, in this thread, to compute what the worker should answer."""
    from calibration.model import Inspector, Model
    from engines.runtimes import Deployment

    with Inspector(Model(fitted_model), Deployment(runtime="onnxruntime", threads=1)) as inspector:
        yield inspector


def test_inference_worker_scores_frames_and_answers_malformed_ones(fitted_model, inspector, net):
    from engines.runtimes import Deployment

    rng = np.random.default_rng(0)
    square = normal_frame(rng, 128)
    grey = rng.integers(0, 255, (300, 200, 1), endpoint=True).astype(np.uint8)
    small = normal_frame(rng, 96)[:, :80]
    small_png = png_bytes(small)
    later = normal_frame(rng, 128)
    deep = rng.integers(0, 65535, (50, 70, 4), endpoint=True).astype(np.uint16)
    pix = np.arange(60, dtype=np.uint8).tobytes()  # [4, 5, 3] uint8
    # a large JPEG with fine texture, where decoding at 1/4 and decoding whole then resizing differ
    big = np.clip(normal_frame(rng, 520, 600).astype(int) + rng.integers(-60, 60, (520, 600, 3)), 0, 255)
    big_jpeg = cv2.imencode(".jpg", big.astype(np.uint8))[1].tobytes()
    messages = [
        wire.encode_frame("cam0", 0, square),
        wire.encode_frame("cam0", 1, grey),
        wire.encode_frame_encoded("cam0", 2, small_png, (96, 80, 3), "png"),
        [b"\xc1 these bytes are not msgpack", pix],  # not attributable: nothing comes back
        [msgpack.packb([1, "frame", "cam0", 3]), pix],  # a msgpack list, not a map: nothing
        [frame_header(4, v=2), pix],  # another version: its fields mean nothing to us
        [frame_header(5), pix[:-1]],  # raw payload one byte short
        [frame_header(6, dtype="float64"), pix * 8],
        [frame_header(7, shape=[4, 5, 2]), pix[:40]],
        wire.encode_frame_encoded("cam0", 8, b"no jpeg in here", (8, 8, 3), "jpeg", t_ns=123),
        wire.encode_eos("cam0", 9),  # a worker takes frames only
        wire.encode_frame("cam0", 9, np.zeros((1, 1, 1), np.uint8), t_ns=123, meta={"file": "x.png"},
                          error="x.png: unreadable"),
        wire.encode_frame("cam0", 10, later, meta={"error": "the user's own key"}),  # meta is only echoed
        wire.encode_frame("cam0", 11, deep),
        wire.encode_frame_encoded("cam0", 13, big_jpeg, (520, 600, 3), "jpeg"),
        wire.encode_frame("cam0", 12, square),  # the sentinel
    ]
    stop = threading.Event()
    frames_ep, out_ep, control_ep = net.endpoint("frames"), net.endpoint("scored"), net.endpoint("control")
    push = net.socket(zmq.PUSH, bind=frames_ep)
    pull = net.socket(zmq.PULL, bind=out_ep)
    control = net.socket(zmq.PULL, bind=control_ep)
    run = Background(inference_worker, fitted_model, [frames_ep], [out_ep],
                     deployment=Deployment(runtime="onnxruntime", threads=1), batch=4, batch_ms=5.0,
                     control=control_ep, stop=stop)
    try:
        wait_ready(control, run)
        for message in messages:
            push.send_multipart(message)
        out = receive_until(pull, ("cam0", 12))
        assert not pull.poll(0)
    finally:
        stop.set()
        run.thread.join(TIMEOUT_S)
        assert not run.thread.is_alive(), "inference worker did not end on stop"
    stats = run.finish(0)

    by_seq = {_key(m)[1]: m for m in out}
    assert len(by_seq) == len(out)  # one answer per frame
    assert sorted(by_seq) == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13]

    # valid frames: a scored message with the canvas map of the frame, as the model scores it here
    model = inspector.model
    originals = {0: square, 1: grey, 2: small, 10: later, 11: deep, 12: square}
    for seq, image in originals.items():
        scored = by_seq[seq]
        assert isinstance(scored, wire.Scored)
        assert (scored.stream, scored.seq, scored.shape) == ("cam0", seq, image.shape)
        assert scored.grid_map.shape == (16, 16) and scored.grid_map.dtype == np.float32
        assert set(scored.timing) == {"queue", "preprocess", "infer", "batch", "inputs"}
        assert 1 <= scored.timing["batch"] <= 4
        # the worker's conversion: 16-bit to 8, grey to RGB, alpha dropped; then the model's geometry
        rgb = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
        rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb[:, :, :3]
        (want,) = inspector.inspect([np.ascontiguousarray(rgb)])
        np.testing.assert_allclose(scored.grid_map, want.canvas_map, rtol=1e-3, atol=1e-3)
        assert scored.score == pytest.approx(want.score, rel=1e-3, abs=1e-3)
        # the canvas travels with defective frames only, for their overlays
        if model.is_defect(scored.score):
            np.testing.assert_array_equal(scored.image, model.geometer.canvas_image(rgb, want.layout))
        else:
            assert scored.image is None
    assert by_seq[10].meta == {"error": "the user's own key"}

    # a large JPEG is decoded at the reduced scale fit and eval decode it at (read_frame), scored in frame pixels
    from calibration.images import decode as decode_file

    layout = model.layout((520, 600))
    shrink = model.geometer.decode_shrink(layout)
    assert shrink == 4 and by_seq[13].shape == (520, 600, 3)
    (want,) = inspector.inspect([decode_file(big_jpeg, shrink=shrink)], [layout])
    np.testing.assert_allclose(by_seq[13].grid_map, want.canvas_map, rtol=1e-3, atol=1e-3)
    assert by_seq[13].score == pytest.approx(want.score, rel=1e-3, abs=1e-3)
    (whole,) = inspector.inspect([decode_file(big_jpeg)])
    assert np.abs(whole.canvas_map - want.canvas_map).max() > 1e-2  # so the check above tells the two apart

    # malformed frames whose header named stream and seq: an error result saying why
    reasons = {5: "payload", 6: "dtype", 7: "channels", 8: "jpeg"}
    for seq, word in reasons.items():
        result = by_seq[seq]
        assert isinstance(result, wire.Result) and result.verdict == "error"
        assert result.error.startswith("rejected:") and word in result.error
        assert result.t_ns == 123
    unreadable = by_seq[9]
    assert isinstance(unreadable, wire.Result) and unreadable.verdict == "error"
    assert unreadable.error == "x.png: unreadable" and unreadable.meta == {"file": "x.png"}

    assert stats.rejected == {"not_msgpack": 2, "bad_version": 1, "payload_size": 1, "bad_dtype": 1,
                              "bad_shape": 1, "bad_payload": 1, "bad_kind": 1}
    assert stats.errors == 5 and stats.frames == 7 and 2 <= stats.batches <= 7


def test_inference_worker_runs_full_batches_before_it_is_ready(fitted_model, net, monkeypatch):
    """The first frames of a run are not the warm-up: the network has seen the batch shape before 'ready'."""
    from calibration.model import Inspector
    from engines.runtimes import Deployment
    from pipeline.workers import WARM_BATCHES

    sizes = []
    inspect = Inspector.inspect
    monkeypatch.setattr(Inspector, "inspect", lambda self, images, *a: sizes.append(len(images)) or inspect(self, images, *a))
    stop = threading.Event()
    control_ep = net.endpoint("control")
    control = net.socket(zmq.PULL, bind=control_ep)
    run = Background(inference_worker, fitted_model, [net.endpoint("frames")], [net.endpoint("scored")],
                     deployment=Deployment(runtime="onnxruntime", threads=1), batch=3, control=control_ep, stop=stop)
    try:
        wait_ready(control, run)
        assert sizes == [3] * WARM_BATCHES
    finally:
        stop.set()
        run.thread.join(TIMEOUT_S)
    run.finish(0)


def test_inference_worker_held_back_by_a_receiver_that_is_gone_still_ends_on_stop(fitted_model, net):
    """Its postprocess worker died with full queues (the supervisor killed outright, every stage told to
    stop): a worker waiting to send ends on stop, as SIGTERM sets it, instead of waiting forever."""
    from engines.runtimes import Deployment

    stop = threading.Event()
    frames_ep, control_ep = net.endpoint("frames"), net.endpoint("control")
    push = net.socket(zmq.PUSH, bind=frames_ep)
    control = net.socket(zmq.PULL, bind=control_ep)
    batch = 2  # results queue up to 4 * batch for a receiver nobody runs: the fifth batch cannot be sent
    run = Background(inference_worker, fitted_model, [frames_ep], [net.endpoint("nobody")],
                     deployment=Deployment(runtime="onnxruntime", threads=1), batch=batch, batch_ms=5.0,
                     control=control_ep, stop=stop)
    try:
        wait_ready(control, run)
        frame = normal_frame(np.random.default_rng(0), 128)
        for seq in range(8 * batch):
            push.send_multipart(wire.encode_frame("cam0", seq, frame))
        counts, deadline = [], time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and not (counts and counts[-1] == 4 * batch and not control.poll(1000)):
            if control.poll(100):
                counts.append(wire.decode(control.recv_multipart()).data["frames"])
        assert counts[-1] == 4 * batch, f"the worker sent stats {counts}, not stuck at {4 * batch} frames"
        assert run.thread.is_alive()  # waiting to send the fifth batch
    finally:
        stop.set()
        run.thread.join(TIMEOUT_S)
        assert not run.thread.is_alive(), "a worker waiting on a receiver that is gone did not end on stop"
    assert run.finish(0).frames == 4 * batch


# ---- postprocess worker ----

@pytest.fixture
def thresholds(fitted_model) -> dict:
    return json.loads((fitted_model / "thresholds.json").read_text())


def start_postprocess(net: Net, fitted_model: Path, stop: threading.Event, **kwargs):
    """postprocess_worker in a thread: (it, a PUSH to its input, a PULL bound as its sink) once it is ready."""
    in_ep, sink_ep, control_ep = net.endpoint("post-in"), net.endpoint("results"), net.endpoint("control")
    sink = net.socket(zmq.PULL, bind=sink_ep)
    control = net.socket(zmq.PULL, bind=control_ep)
    run = Background(postprocess_worker, fitted_model, in_ep, sink_ep, control=control_ep, stop=stop, **kwargs)
    try:
        wait_ready(control, run)
    except BaseException:
        stop_worker(run, stop)
        raise
    return run, net.socket(zmq.PUSH, connect=in_ep), sink


def stop_worker(run: Background, stop: threading.Event) -> None:
    stop.set()
    run.thread.join(TIMEOUT_S)
    assert not run.thread.is_alive(), "worker did not end on stop"


def test_postprocess_worker_turns_scored_frames_into_results(fitted_model, thresholds, net, tmp_path):
    overlays = tmp_path / "overlays"
    rng = np.random.default_rng(1)
    low = thresholds["image"]["min"]
    plain = decoded(wire.encode_frame("cam0", 0, normal_frame(rng, 128)[:60, :90], t_ns=111, meta={"file": "a.png"}))
    image = normal_frame(rng, 160)[:96]  # 96 x 160
    hot = decoded(wire.encode_frame_encoded("cam0", 1, png_bytes(image), (96, 160, 3), "png", t_ns=222))
    grid = np.zeros((16, 16), np.float32)
    grid[2:6, 10:14] = 100.0  # far above both thresholds, in the top right
    error = wire.Result("cam0", 2, 333, "error", error="rejected: bad payload", meta={"file": "c.png"})
    third = decoded(wire.encode_frame("cam0", 3, np.zeros((8, 8, 3), np.uint8), t_ns=444))
    broken = wire.encode_scored(third, low, np.zeros((16, 16), np.float32), None, {})
    broken = [broken[0], bytes(broken[1])[:-4]]  # map 4 bytes short, stream / seq known
    sentinel = decoded(wire.encode_frame("cam0", 4, np.zeros((8, 8, 3), np.uint8)))
    stop = threading.Event()
    run, push, sink = start_postprocess(net, fitted_model, stop, overlays=overlays)
    try:
        push.send_multipart(wire.encode_scored(plain, low, np.zeros((16, 16), np.float32), None, {"infer": 1.5}))
        push.send_multipart(wire.encode_scored(hot, 100.0, grid, cv2.resize(image, (128, 128)), {"infer": 2.5}))
        push.send_multipart(wire.encode_result(error))
        push.send_multipart([b"\xc1 garbage"])
        push.send_multipart(wire.encode_frame("cam0", 9, np.zeros((2, 2, 3), np.uint8)))  # a frame, not scored
        push.send_multipart(broken)
        push.send_multipart(wire.encode_scored(sentinel, low, np.zeros((16, 16), np.float32), None, {}))
        out = receive_until(sink, ("cam0", 4))
        assert not sink.poll(0)
    finally:
        stop_worker(run, stop)
    stats = run.finish(0)

    assert all(isinstance(r, wire.Result) for r in out)
    by_seq = {r.seq: r for r in out}
    assert sorted(by_seq) == [0, 1, 2, 3, 4] and len(out) == 5

    ok = by_seq[0]
    assert (ok.verdict, ok.score, ok.regions, ok.defect_map, ok.error) == ("ok", 0.0, (), None, None)
    assert ok.t_ns == 111 and ok.meta == {"file": "a.png"}
    assert ok.timing["infer"] == 1.5 and ok.timing["post"] >= 0

    defect = by_seq[1]
    assert defect.verdict == "defect" and defect.score == pytest.approx(1.0) and defect.t_ns == 222
    assert defect.regions and all(r.score >= 0.5 for r in defect.regions)
    assert defect.defect_map.dtype == np.uint8 and defect.defect_map.shape == (96, 160)
    x, y, w, h = defect.regions[0].bbox
    assert x <= 120 < x + w and y <= 24 < y + h  # the hot cells' centre, in frame pixels
    assert defect.defect_map[24, 120] == 255 and defect.defect_map[80, 20] < 128  # hot corner, quiet corner
    assert sorted(p.name for p in overlays.iterdir()) == ["cam0-00000001.jpg"]  # defective frames only
    assert cv2.imread(str(overlays / "cam0-00000001.jpg")).shape == (128, 128, 3)  # drawn at the canvas size

    assert by_seq[2] == error  # passed on unchanged
    assert by_seq[3].verdict == "error" and by_seq[3].error.startswith("rejected:") and by_seq[3].t_ns == 444
    assert "anomaly map" in by_seq[3].error
    assert by_seq[4].verdict == "ok"

    assert stats.rejected == {"not_msgpack": 1, "bad_kind": 1, "payload_size": 1}
    assert stats.frames == 3 and stats.errors == 2


def test_postprocess_a_defect_below_the_pixel_threshold_still_has_a_region(fitted_model, thresholds, net):
    # the image score crosses its threshold, while the smoothed map stays below the pixel threshold
    image, pixel = thresholds["image"], thresholds["pixel"]
    grid = np.full((16, 16), pixel["min"], np.float32)
    grid[5, 9] = pixel["min"] + 0.2 * (pixel["threshold"] - pixel["min"])
    raw = image["threshold"] + 0.5 * (image["threshold"] - image["min"])
    frame = decoded(wire.encode_frame("cam0", 0, np.full((48, 64, 3), 128, np.uint8)))
    stop = threading.Event()
    run, push, sink = start_postprocess(net, fitted_model, stop)
    try:
        push.send_multipart(wire.encode_scored(frame, float(raw), grid, None, {}))
        assert sink.poll(int(TIMEOUT_S * 1000))
        result = wire.decode(sink.recv_multipart())
    finally:
        stop_worker(run, stop)
    run.finish(0)
    assert result.verdict == "defect" and result.score == pytest.approx(0.75, abs=1e-3)
    assert result.defect_map.shape == (48, 64) and result.defect_map.max() < 128  # no pixel is defective ...
    (region,) = result.regions  # ... yet the defect is located: the cell behind the image score
    x, y, w, h = region.bbox
    assert (x, y, w, h) == (9 * 4, 5 * 3, 4, 3)  # cell (5, 9) of 16 x 16 on a 48 x 64 frame


def test_a_signal_arriving_while_a_handler_sets_an_event_is_queued_not_deadlocked():
    """Python may run a handler inside another handler's Event.set, which holds the event's lock: the
    inner one set the same event and waited on that lock forever (a killed supervisor's stage gets its
    parent-death signal once per exiting thread). SignalActions queues what comes in meanwhile."""
    from pipeline.workers import SignalActions

    actions, stop, end, done = SignalActions(), threading.Event(), threading.Event(), []

    def set_then_interrupted():  # the outer handler's action, "interrupted" by two more signals
        with stop._cond:  # as inside Event.set: the lock held
            actions(stop.set)  # a nested handler for the same event: queued, not run here
            actions(end.set)
            assert not end.is_set() and len(actions.pending) == 3
            stop._flag = True
        done.append(True)

    finisher = threading.Thread(target=lambda: actions(set_then_interrupted))
    finisher.start()
    finisher.join(5)
    assert not finisher.is_alive(), "deadlocked"
    assert done and stop.is_set() and end.is_set() and not actions.pending and not actions.running
