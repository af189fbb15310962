"""Wire format version 1: round trips, zero copies, sockets and every rejection with its reason code."""

from __future__ import annotations

import pickle

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from engines.errors import LineguardError
from pipeline import wire
from pipeline.wire import MAX_HEADER_BYTES, MAX_SIDE, Eos, Frame, Region, Result, WireError, decode

PIX = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
DROP = object()  # a header field to leave out


def header(kind: str = "frame", /, **changes) -> bytes:
    """A packed, valid header of ``kind`` for stream cam0, seq 7, with fields changed or DROPped."""
    fields = {
        "frame": {"stream": "cam0", "seq": 7, "t_ns": 123, "shape": [4, 5, 3], "dtype": "uint8", "encoding": "raw",
                  "product": None, "meta": {}},
        "result": {"stream": "cam0", "seq": 7, "t_ns": 123, "verdict": "ok", "score": 0.1, "regions": [],
                   "timing": {}, "error": None},
        "eos": {"stream": "cam0", "count": 8},
    }[kind]
    h = {"v": 1, "kind": kind, **fields, **changes}
    return msgpack.packb({k: v for k, v in h.items() if v is not DROP})


def raw(payload: bytes = PIX.tobytes(), **changes) -> list:
    return [header("frame", **changes), payload]


def rejected(frames, reason: str) -> WireError:
    with pytest.raises(WireError) as info:
        decode(frames)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)  # says what was received and expected
    return info.value


def png(image: np.ndarray) -> bytes:
    """png bytes of an RGB / RGBA / grey image (OpenCV wants BGR order)."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


# ---- round trips ----

@pytest.mark.parametrize("shape,dtype", [((6, 7, 3), np.uint8), ((6, 7, 1), np.uint8), ((5, 4, 3), np.uint16),
                                         ((3, 2, 4), np.uint8), ((1, 1, 1), np.uint16)])
def test_raw_frame_round_trip(shape, dtype):
    image = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    f = decode(wire.encode_frame("cam0", 17, image, t_ns=99, product="bolt", meta={"exposure_us": 800, "ok": True}))
    assert isinstance(f, Frame) and f.kind == "frame"
    assert (f.stream, f.seq, f.t_ns, f.shape, f.encoding) == ("cam0", 17, 99, shape, "raw")
    assert f.dtype == np.dtype(dtype).name
    assert (f.product, f.meta) == ("bolt", {"exposure_us": 800, "ok": True})
    out = f.image()
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(out, image)


def test_frame_defaults_and_grey_2d():
    image = np.zeros((3, 4), np.uint8)
    f = decode(wire.encode_frame("s", 0, image))
    assert f.shape == (3, 4, 1) and f.product is None and f.meta == {} and f.t_ns > 0
    np.testing.assert_array_equal(f.image()[:, :, 0], image)


def test_uint16_is_little_endian_on_the_wire():
    image = np.array([[[0x0102]]], dtype=">u2")  # big-endian input is converted, values kept
    frames = wire.encode_frame("s", 0, image)
    assert bytes(frames[1]) == b"\x02\x01"
    assert decode(frames).image()[0, 0, 0] == 0x0102


def test_encode_frame_is_zero_copy():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    frames = wire.encode_frame("s", 0, image)
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), image)


def test_non_contiguous_image_is_copied_once_and_still_correct():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)[::2, 1::2]
    frames = wire.encode_frame("s", 0, image)
    assert not np.shares_memory(np.frombuffer(frames[1], np.uint8), image)
    np.testing.assert_array_equal(decode(frames).image(), image)


def test_decoded_raw_image_is_a_read_only_view_of_the_received_buffer():
    received = bytearray(PIX.tobytes())  # a writable buffer, so read-only is the decoder's doing
    image = decode([header(), memoryview(received)]).image()
    assert np.shares_memory(image, np.frombuffer(received, np.uint8))
    assert not image.flags.writeable
    with pytest.raises(ValueError):
        image[0, 0, 0] = 1


@pytest.mark.parametrize("shape", [(6, 7, 3), (6, 7, 1)])
def test_jpeg_round_trip(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if shape[2] == 3 else image)
    f = decode(wire.encode_frame_encoded("cam1", 3, data.tobytes(), shape, "jpeg", t_ns=5, product="p", meta={"a": 1}))
    assert (f.stream, f.seq, f.t_ns, f.shape, f.dtype, f.encoding, f.product, f.meta) == (
        "cam1", 3, 5, shape, "uint8", "jpeg", "p", {"a": 1})
    expected = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    expected = cv2.cvtColor(expected, cv2.COLOR_BGR2RGB) if shape[2] == 3 else expected[:, :, None]
    out = f.image()
    np.testing.assert_array_equal(out, expected)  # exactly OpenCV's decoding, in RGB order
    assert not out.flags.writeable


@pytest.mark.parametrize("shape,dtype", [((6, 7, 3), np.uint8), ((6, 7, 1), np.uint8), ((6, 7, 4), np.uint8),
                                         ((5, 3, 3), np.uint16)])
def test_png_round_trip_is_exact(shape, dtype):
    image = np.random.default_rng(2).integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    data = png(image if shape[2] != 1 else image[:, :, 0])
    f = decode(wire.encode_frame_encoded("s", 0, data, shape, "png", dtype=np.dtype(dtype).name))
    assert f.encoding == "png" and bytes(f.payload) == data
    np.testing.assert_array_equal(f.image(), image)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_decodes_at_a_reduced_scale_when_asked_and_other_frames_whole(channels):
    rng = np.random.default_rng(4)
    image = cv2.GaussianBlur(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8), (0, 0), 2)
    ok, data = cv2.imencode(".jpg", image)
    f = decode(wire.encode_frame_encoded("cam1", 3, data.tobytes(), (37, 50, channels), "jpeg"))
    small = f.image(shrink=4)
    assert small.shape == (10, 13, channels) and not small.flags.writeable  # 1/4, each side rounded up
    want = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION)
    want = cv2.cvtColor(want, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(small, want.reshape(small.shape))
    assert f.image().shape == (37, 50, channels)
    raw = decode(wire.encode_frame("cam1", 4, image))
    np.testing.assert_array_equal(raw.image(shrink=4), image)  # raw pixels come as they are
    png_frame = decode(wire.encode_frame_encoded("s", 0, png(image), (37, 50, 3), "png"))
    assert png_frame.image(shrink=2).shape == (37, 50, 3)


def test_encoded_file_is_converted_to_the_header_channel_count():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    f = decode(wire.encode_frame_encoded("s", 0, png(grey), (3, 4, 3), "png"))
    np.testing.assert_array_equal(f.image(), np.repeat(grey[:, :, None], 3, axis=2))


def test_result_round_trip_without_map():
    r = Result("cam0", 9, 1234, "defect", 0.87, (Region((1, 2, 30, 40), 900, 0.9), Region((0, 0, 1, 1), 1, 0.5)),
               {"infer": 3.5, "post": 1}, None)
    frames = wire.encode_result(r)
    assert len(frames) == 1
    d = decode(frames)
    assert isinstance(d, Result) and d.kind == "result" and d == r
    assert (d.stream, d.seq, d.t_ns, d.verdict, d.score, d.error) == ("cam0", 9, 1234, "defect", 0.87, None)
    assert d.regions == (Region((1, 2, 30, 40), 900, 0.9), Region((0, 0, 1, 1), 1, 0.5))
    assert d.timing == {"infer": 3.5, "post": 1.0} and d.defect_map is None


def test_result_round_trip_with_map_is_a_read_only_view():
    defect_map = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5)
    r = Result("cam0", 0, 1, "ok", None, (), {}, None, defect_map)
    frames = wire.encode_result(r)
    assert len(frames) == 2 and np.shares_memory(np.frombuffer(frames[1], np.uint8), defect_map)
    d = decode([frames[0], bytearray(frames[1])])
    assert d == r and d.score is None and d.regions == ()
    np.testing.assert_array_equal(d.defect_map, defect_map)
    assert d.defect_map.dtype == np.uint8 and not d.defect_map.flags.writeable
    assert d != Result("cam0", 0, 1, "ok", None, (), {}, None, defect_map + 1)
    assert d != Result("cam0", 0, 1, "ok")


def test_numpy_scalars_are_accepted_from_encoders_and_arrive_as_python_numbers():
    r = decode(wire.encode_result(Result("s", np.int64(3), np.uint64(5), "defect", np.float32(0.5),
                                         (Region(np.array([1, 2, 3, 4]), np.int32(12), np.float32(0.25)),),
                                         {"infer": np.float32(1.5)})))
    assert (r.seq, r.t_ns, r.score, r.timing) == (3, 5, 0.5, {"infer": 1.5})
    assert r.regions == (Region((1, 2, 3, 4), 12, 0.25),)
    assert type(r.seq) is int and type(r.score) is float and type(r.timing["infer"]) is float
    f = decode(wire.encode_frame_encoded("s", np.int64(1), png(PIX), (4, 5, 3), "png", dtype=np.dtype("uint8")))
    assert f.dtype == "uint8" and type(f.dtype) is str and type(f.seq) is int


def test_error_result_round_trip():
    r = Result("cam0", 5, 7, "error", error="frame rejected: payload_size")
    assert decode(wire.encode_result(r)) == r


def test_eos_round_trip():
    e = decode(wire.encode_eos("cam0", 42))
    assert isinstance(e, Eos) and e.kind == "eos" and (e.stream, e.count) == ("cam0", 42)


def test_decode_accepts_bytes_memoryviews_and_zmq_frames():
    frames = wire.encode_frame("s", 1, PIX)
    for convert in (bytes, memoryview, lambda b: zmq.Frame(bytes(b))):
        np.testing.assert_array_equal(decode([convert(b) for b in frames]).image(), PIX)


# ---- over real sockets ----

@pytest.fixture(params=["inproc", "ipc"])
def push_pull(request, tmp_path):
    """A connected (PUSH, PULL) pair; every call times out after 2 s instead of hanging."""
    if request.param == "ipc" and not zmq.has("ipc"):
        pytest.skip("this libzmq has no ipc transport")
    endpoint = "inproc://wire-test" if request.param == "inproc" else f"ipc://{tmp_path / 'wire.sock'}"
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        for s in (pull, push):
            s.linger, s.rcvtimeo, s.sndtimeo = 0, 2000, 2000
        pull.bind(endpoint)
        push.connect(endpoint)
        yield push, pull
    finally:
        ctx.destroy(linger=0)


def test_messages_over_sockets(push_pull):
    push, pull = push_pull
    image = np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)  # over pyzmq's copy threshold
    defect_map = np.full((60, 80), 7, np.uint8)
    result = Result("cam0", 0, 11, "defect", 2.0, (Region((1, 1, 2, 2), 4, 2.0),), {"infer": 1.0}, None, defect_map)
    sent = (wire.encode_frame("cam0", 0, image, t_ns=11), wire.encode_result(result), wire.encode_eos("cam0", 1))
    for frames in sent:
        push.send_multipart(frames, copy=False)
    received = pull.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in received)
    f = decode(received)
    out = f.image()
    np.testing.assert_array_equal(out, image)
    assert np.shares_memory(out, np.frombuffer(received[1].buffer, np.uint8))
    assert decode(pull.recv_multipart(copy=False)) == result
    assert decode(pull.recv_multipart(copy=False)) == Eos("cam0", 1)


# ---- rejections ----

REJECTIONS = [
    pytest.param(lambda: [], "frame_count", None, None, id="zero-frames"),
    pytest.param(lambda: [b"\xc1garbage", PIX.tobytes()], "not_msgpack", None, None, id="garbage-header"),
    pytest.param(lambda: [b"", PIX.tobytes()], "not_msgpack", None, None, id="empty-header"),
    pytest.param(lambda: [msgpack.packb([1, "frame"]), PIX.tobytes()], "not_msgpack", None, None, id="list-header"),
    pytest.param(lambda: [msgpack.packb({1: 2})], "not_msgpack", None, None, id="int-key"),
    pytest.param(lambda: [b"\x00" * (MAX_HEADER_BYTES + 1)], "header_too_large", None, None, id="header-too-large"),
    pytest.param(lambda: raw(v=2), "bad_version", None, None, id="version-2"),
    pytest.param(lambda: raw(v=True), "bad_version", None, None, id="version-bool"),
    pytest.param(lambda: raw(v="1"), "bad_version", None, None, id="version-str"),
    pytest.param(lambda: raw(v=DROP), "bad_version", None, None, id="version-missing"),
    pytest.param(lambda: raw(kind="image"), "bad_kind", "cam0", 7, id="kind-unknown"),
    pytest.param(lambda: raw(kind=DROP), "bad_kind", "cam0", 7, id="kind-missing"),
    pytest.param(lambda: raw(shape=[4, 5]), "bad_shape", "cam0", 7, id="shape-2-dims"),
    pytest.param(lambda: raw(shape=[0, 5, 3]), "bad_shape", "cam0", 7, id="shape-zero"),
    pytest.param(lambda: raw(shape=[-4, 5, 3]), "bad_shape", "cam0", 7, id="shape-negative"),
    pytest.param(lambda: raw(shape=[MAX_SIDE + 1, 5, 3]), "bad_shape", "cam0", 7, id="shape-side-too-large"),
    pytest.param(lambda: raw(shape=[4, 5, 5]), "bad_shape", "cam0", 7, id="shape-5-channels"),
    pytest.param(lambda: raw(shape=[4, 5, True]), "bad_shape", "cam0", 7, id="shape-bool"),
    pytest.param(lambda: raw(shape="4x5x3"), "bad_shape", "cam0", 7, id="shape-str"),
    pytest.param(lambda: raw(dtype="float32"), "bad_dtype", "cam0", 7, id="dtype-unknown"),
    pytest.param(lambda: raw(encoding="webp"), "bad_encoding", "cam0", 7, id="encoding-unknown"),
    pytest.param(lambda: raw(PIX.tobytes()[:-1]), "payload_size", "cam0", 7, id="raw-one-byte-short"),
    pytest.param(lambda: raw(PIX.tobytes() + b"\x00"), "payload_size", "cam0", 7, id="raw-one-byte-long"),
    pytest.param(lambda: raw(dtype="uint16"), "payload_size", "cam0", 7, id="raw-dtype-size"),
    pytest.param(lambda: raw()[:1], "frame_count", "cam0", 7, id="payload-missing"),
    pytest.param(lambda: raw() + [b"x"], "frame_count", "cam0", 7, id="extra-frame"),
    pytest.param(lambda: raw(seq=-1), "bad_field", "cam0", None, id="seq-negative"),
    pytest.param(lambda: raw(seq=True), "bad_field", "cam0", None, id="seq-bool"),
    pytest.param(lambda: raw(seq="7"), "bad_field", "cam0", None, id="seq-str"),
    pytest.param(lambda: raw(seq=7.0), "bad_field", "cam0", None, id="seq-float"),
    pytest.param(lambda: raw(seq=DROP), "bad_field", "cam0", None, id="seq-missing"),
    pytest.param(lambda: raw(stream=3), "bad_field", None, 7, id="stream-int"),
    pytest.param(lambda: raw(stream=""), "bad_field", None, 7, id="stream-empty"),
    pytest.param(lambda: raw(t_ns=DROP), "bad_field", "cam0", 7, id="t_ns-missing"),
    pytest.param(lambda: raw(t_ns=False), "bad_field", "cam0", 7, id="t_ns-bool"),
    pytest.param(lambda: raw(product=5), "bad_field", "cam0", 7, id="product-int"),
    pytest.param(lambda: raw(meta=[1]), "bad_field", "cam0", 7, id="meta-list"),
    pytest.param(lambda: raw(prodcut="bolt"), "bad_field", "cam0", 7, id="unknown-field"),
    pytest.param(lambda: [header("result", verdict="maybe")], "bad_field", "cam0", 7, id="verdict-unknown"),
    pytest.param(lambda: [header("result", verdict="error")], "bad_field", "cam0", 7, id="error-verdict-no-text"),
    pytest.param(lambda: [header("result", score="high")], "bad_field", "cam0", 7, id="score-str"),
    pytest.param(lambda: [header("result", regions=[{"bbox": [1, 2, 3], "area": 1, "score": 0.0}])], "bad_field",
                 "cam0", 7, id="region-bbox-3"),
    pytest.param(lambda: [header("result", regions=[{"bbox": [1, 2, 3, 4], "area": 1}])], "bad_field",
                 "cam0", 7, id="region-no-score"),
    pytest.param(lambda: [header("result", timing={"infer": "fast"})], "bad_field", "cam0", 7, id="timing-str"),
    pytest.param(lambda: [header("result", map_shape=[3, 4]), bytes(11)], "payload_size", "cam0", 7,
                 id="map-size-mismatch"),
    pytest.param(lambda: [header("result", map_shape=[12]), bytes(12)], "bad_shape", "cam0", 7, id="map-shape-1-dim"),
    pytest.param(lambda: [header("result", map_shape=[3, 4])], "frame_count", "cam0", 7, id="map-missing"),
    pytest.param(lambda: [header("result"), bytes(12)], "frame_count", "cam0", 7, id="map-without-map-shape"),
    pytest.param(lambda: [header("eos", count=-1)], "bad_field", "cam0", None, id="eos-count-negative"),
    pytest.param(lambda: [header("eos"), b"x"], "frame_count", "cam0", None, id="eos-with-payload"),
]


@pytest.mark.parametrize("make,reason,stream,seq", REJECTIONS)
def test_rejection(make, reason, stream, seq):
    e = rejected(make(), reason)
    assert isinstance(e, LineguardError)
    assert (e.stream, e.seq) == (stream, seq)


def test_rejection_carries_t_ns_when_known():
    assert rejected(raw(PIX.tobytes()[:-1]), "payload_size").t_ns == 123
    assert rejected(raw(t_ns="now"), "bad_field").t_ns is None


def test_header_too_large_even_when_it_is_valid_msgpack():
    rejected(raw(meta={"blob": "x" * MAX_HEADER_BYTES}), "header_too_large")


def test_garbage_jpeg_fails_when_decoded_with_stream_and_seq():
    f = decode(wire.encode_frame_encoded("cam0", 7, b"\xff\xd8 not a jpeg at all", (4, 5, 3), "jpeg", t_ns=3))
    with pytest.raises(WireError) as info:
        f.image()
    assert info.value.reason == "bad_payload" and (info.value.stream, info.value.seq, info.value.t_ns) == ("cam0", 7, 3)


def test_truncated_jpeg_with_the_right_size_does_not_decode():
    ok, data = cv2.imencode(".jpg", np.zeros((4, 5, 3), np.uint8))
    f = decode(wire.encode_frame_encoded("cam0", 7, data.tobytes()[:200], (4, 5, 3), "jpeg"))
    with pytest.raises(WireError) as info:
        f.image()
    assert info.value.reason == "bad_payload"


@pytest.mark.parametrize("shape,dtype", [((5, 5, 3), "uint8"), ((4, 5, 3), "uint16"), ((4, 5, 2), None)])
def test_png_that_decodes_to_another_shape_or_dtype(shape, dtype):
    if dtype is None:  # 2 channels never leave the encoder
        with pytest.raises(WireError, match="channels") as info:
            wire.encode_frame_encoded("cam0", 7, png(PIX), shape, "png")
        assert info.value.reason == "bad_shape"
        return
    f = decode(wire.encode_frame_encoded("cam0", 7, png(PIX), shape, "png", dtype=dtype))
    with pytest.raises(WireError) as info:
        f.image()
    assert info.value.reason == "bad_payload" and (info.value.stream, info.value.seq) == ("cam0", 7)


def test_a_file_larger_than_its_header_is_refused_before_decoding(monkeypatch):
    ok, data = cv2.imencode(".jpg", np.zeros((40, 50, 3), np.uint8))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a file whose size was already wrong"))
    for encoding, payload in (("jpeg", data.tobytes()), ("png", png(np.zeros((40, 50, 3), np.uint8)))):
        f = decode(wire.encode_frame_encoded("cam0", 7, payload, (4, 5, 3), encoding))
        with pytest.raises(WireError, match="40x50") as info:
            f.image()
        assert info.value.reason == "bad_payload"


@pytest.mark.parametrize("corruption", ["chunk-length", "no-IEND"])
def test_png_with_a_chunk_past_its_end_is_refused_before_decoding(monkeypatch, corruption):
    data = bytearray(png(PIX))
    if corruption == "chunk-length":
        assert data[37:41] == b"IDAT"
        data[33] = 0x7F  # IDAT claims ~2 GB: OpenCV would allocate that for a 100-byte file
    else:
        assert data[-8:-4] == b"IEND"
        del data[-12:]
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a png whose chunks do not fit"))
    f = decode(wire.encode_frame_encoded("cam0", 7, bytes(data), (4, 5, 3), "png"))
    with pytest.raises(WireError, match="not a whole png") as info:
        f.image()
    assert info.value.reason == "bad_payload"


def test_encoders_refuse_what_decode_would_reject():
    cases = [
        (lambda: wire.encode_frame("s", 0, PIX.astype(np.float32)), "bad_dtype"),
        (lambda: wire.encode_frame("s", 0, PIX[None]), "bad_shape"),
        (lambda: wire.encode_frame("s", 0, np.zeros((2, 2, 2), np.uint8)), "bad_shape"),
        (lambda: wire.encode_frame("s", 0, np.zeros((0, 2, 3), np.uint8)), "bad_shape"),
        (lambda: wire.encode_frame("s", 0, PIX.tolist()), "bad_field"),
        (lambda: wire.encode_frame("s", -1, PIX), "bad_field"),
        (lambda: wire.encode_frame("s", 0, PIX, meta={"t": object()}), "bad_field"),
        (lambda: wire.encode_frame("s", 0, PIX, meta={"blob": b"x" * MAX_HEADER_BYTES}), "header_too_large"),
        (lambda: wire.encode_frame_encoded("s", 0, b"data", (4, 5, 3), "raw"), "bad_encoding"),
        (lambda: wire.encode_frame_encoded("s", 0, b"", (4, 5, 3), "png"), "bad_payload"),
        (lambda: wire.encode_eos("s", -1), "bad_field"),
        (lambda: Result("s", 0, 0, "error"), "bad_field"),
        (lambda: Result("s", 0, 0, "ok", defect_map=np.zeros((2, 2), np.float32)), "bad_dtype"),
        (lambda: Result("s", 0, 0, "ok", defect_map=np.zeros((2, 2, 1), np.uint8)), "bad_shape"),
        (lambda: Result("s", 0, 0, "ok", regions=({"bbox": [0, 0, 1, 1]},)), "bad_field"),
    ]
    for make, reason in cases:
        with pytest.raises(WireError) as info:
            make()
        assert info.value.reason == reason, str(info.value)


def test_wire_error_survives_pickling():
    e = rejected(raw(PIX.tobytes()[:-1]), "payload_size")
    copy = pickle.loads(pickle.dumps(e))
    assert (type(copy), copy.reason, copy.stream, copy.seq, copy.t_ns, str(copy)) == (
        WireError, "payload_size", "cam0", 7, 123, str(e))


# ---- property-style ----

def _text(rng) -> str:
    return "".join(rng.choice(list("abcxyz019_-/éß水"), size=int(rng.integers(1, 12))))


def _meta(rng, depth: int = 0) -> dict:
    values = [None, True, int(rng.integers(-2**62, 2**62)), float(rng.normal()), _text(rng), b"\x00\xff",
              [1, "two", 3.5]]
    meta = {_text(rng): values[int(rng.integers(len(values)))] for _ in range(int(rng.integers(0, 4)))}
    if depth < 2 and rng.random() < 0.3:
        meta[_text(rng)] = _meta(rng, depth + 1)
    return meta


def test_random_valid_messages_round_trip():
    rng = np.random.default_rng(4)
    for i in range(150):
        seq = int(rng.integers(0, 2**63)) if i % 10 else 2**64 - 1
        t_ns = int(rng.integers(0, 2**63))
        stream = _text(rng)
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.choice([1, 3, 4])))
        dtype = np.uint8 if rng.random() < 0.5 else np.uint16
        image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
        product = None if rng.random() < 0.3 else _text(rng)
        meta = _meta(rng)
        f = decode(wire.encode_frame(stream, seq, image, t_ns=t_ns, product=product, meta=meta))
        assert (f.stream, f.seq, f.t_ns, f.shape, f.product, f.meta) == (stream, seq, t_ns, shape, product, meta)
        np.testing.assert_array_equal(f.image(), image)

        regions = tuple(Region(tuple(int(v) for v in rng.integers(0, 5000, 4)), int(rng.integers(0, 10**6)),
                               float(rng.normal())) for _ in range(int(rng.integers(0, 5))))
        verdict = str(rng.choice(["ok", "defect", "error"]))
        defect_map = None if rng.random() < 0.5 else rng.integers(0, 256, shape[:2], dtype=np.uint8)
        r = Result(stream, seq, t_ns, verdict, None if rng.random() < 0.2 else float(rng.random()), regions,
                   {_text(rng): float(rng.random()) for _ in range(int(rng.integers(0, 4)))},
                   _text(rng) if verdict == "error" or rng.random() < 0.2 else None, defect_map)
        assert decode(wire.encode_result(r)) == r
        assert decode(wire.encode_eos(stream, seq)) == Eos(stream, seq)


def test_mutated_messages_raise_only_wire_error():
    """Random corruption of valid messages: decode and image() either succeed or raise WireError."""
    rng = np.random.default_rng(5)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((4, 5, 3), np.uint8))
    valid = [wire.encode_frame("cam0", 1, PIX), wire.encode_frame_encoded("cam0", 2, jpeg.tobytes(), (4, 5, 3), "jpeg"),
             wire.encode_frame_encoded("cam0", 3, png(PIX), (4, 5, 3), "png"),
             wire.encode_result(Result("cam0", 1, 1, "defect", 1.0, (Region((0, 0, 1, 1), 1, 1.0),), {"a": 1.0}, None,
                                       np.zeros((2, 3), np.uint8))),
             wire.encode_eos("cam0", 3)]
    outcomes = set()
    for _ in range(400):
        frames = [bytearray(bytes(b)) for b in valid[int(rng.integers(len(valid)))]]
        target = frames[int(rng.integers(len(frames)))]
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(target))) if target else 0
            op = rng.integers(4)
            if op == 0 and target:
                target[pos] = int(rng.integers(256))
            elif op == 1:
                del target[pos:]
            elif op == 2:
                target[pos:pos] = rng.bytes(int(rng.integers(1, 5)))
            elif len(frames) > 1:
                frames.pop()
        try:
            message = decode(frames)
            if isinstance(message, Frame):
                message.image()
            outcomes.add("ok")
        except WireError as e:
            assert e.reason in wire.REASONS
            outcomes.add(e.reason)
    assert "ok" in outcomes and "not_msgpack" in outcomes and len(outcomes) >= 5


def test_scored_round_trip_and_rejections():
    frame = wire.decode([bytes(p) for p in wire.encode_frame("cam0", 3, np.zeros((40, 60, 1), np.uint8), t_ns=9,
                                                             product="lid", meta={"file": "a.png"})])
    grid = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # a non-square canvas
    message = wire.encode_scored(frame, 2.5, grid, image, {"infer": 1.0})
    scored = wire.decode([bytes(p) for p in message])
    assert isinstance(scored, wire.Scored)
    assert (scored.stream, scored.seq, scored.t_ns, scored.shape, scored.product, scored.meta) == \
        ("cam0", 3, 9, (40, 60, 1), "lid", {"file": "a.png"})
    assert scored.score == 2.5 and scored.timing == {"infer": 1.0}
    np.testing.assert_array_equal(scored.grid_map, grid)
    np.testing.assert_array_equal(scored.image, image)
    assert not scored.image.flags.writeable and not scored.grid_map.flags.writeable
    # an ok frame travels without its canvas: one buffer
    bare = wire.encode_scored(frame, 0.1, grid, None, {})
    assert len(bare) == 2
    decoded = wire.decode([bytes(p) for p in bare])
    assert decoded.image is None and decoded.grid_map.shape == (8, 12)
    short = [message[0], message[1], bytes(message[2])[:-3]]
    with pytest.raises(wire.WireError) as err:
        wire.decode(short)
    assert err.value.reason == "payload_size" and (err.value.stream, err.value.seq) == ("cam0", 3)
    with pytest.raises(wire.WireError) as err:
        wire.decode(message[:2])  # the header announces a canvas the message does not carry
    assert err.value.reason == "frame_count"
    with pytest.raises(wire.WireError) as err:
        wire.encode_scored(frame, 1.0, grid, np.zeros((64, 64), np.uint8), {})
    assert err.value.reason == "bad_shape"


def test_frame_error_field_and_user_meta():
    """A producer marks an unreadable frame in the header; a user's meta key named 'error' is only data."""
    marked = wire.decode([bytes(p) for p in wire.encode_frame("cam0", 1, np.zeros((1, 1, 1), np.uint8),
                                                              error="a.png: not a readable image")])
    assert marked.error == "a.png: not a readable image"
    plain = wire.decode([bytes(p) for p in wire.encode_frame("cam0", 2, np.zeros((2, 2, 3), np.uint8),
                                                             meta={"error": "user data"})])
    assert plain.error is None and plain.meta == {"error": "user data"}
    header = msgpack.unpackb(bytes(wire.encode_frame("cam0", 3, np.zeros((1, 1, 1), np.uint8))[0]))
    assert "error" not in header  # absent unless set: version-1 receivers without it still read frames
    with pytest.raises(wire.WireError, match="error"):
        wire.encode_frame("cam0", 4, np.zeros((1, 1, 1), np.uint8), error="")


def test_ack_round_trips_its_held_seqs_and_reads_acks_without_them():
    ack = wire.decode(wire.encode_ack("cam0", 5, [2], False, held=[9, 7]))
    assert (ack.next, ack.missing, ack.held, ack.done) == (5, (2,), (7, 9), False)
    assert [s for s in range(10) if ack.covers(s)] == [0, 1, 3, 4]  # held is not covered: not logged yet
    older = msgpack.packb({"v": 1, "kind": "ack", "stream": "cam0", "next": 3, "missing": [], "done": True})
    assert wire.decode([older]).held == ()  # a sink of the previous version
    with pytest.raises(wire.WireError, match="held seq must be an int in \\[5,"):
        wire.encode_ack("cam0", 5, [], False, held=[4])  # below next: logged already, not held
