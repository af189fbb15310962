"""Hostile input at every endpoint: hundreds of malformed messages (broken msgpack, wrong version or kind,
shape / dtype / buffer disagreements, huge declared sizes, truncated and bomb images, negative and
enormous seqs, odd unicode, oversized meta) interleaved with valid ones, sent to an inference worker,
a postprocess worker and a sink. Every stage stays up, every valid message gets its answer, and every
malformed one is counted as a rejection with one of the wire's reasons."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib

import msgpack
import numpy as np
import pytest
import zmq

from pipeline import wire
from pipeline.sinks import run_sink
from pipeline.workers import inference_worker, postprocess_worker
from plumbing import TIMEOUT_S, Background

N_BAD = 80  # per endpoint: 240 in all


def _png_claiming(h: int, w: int) -> bytes:
    """A whole, tiny PNG whose header claims h x w grey pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _header(kind: str, seq: int, **fields) -> bytes:
    base = {"v": 1, "kind": kind, "stream": "fuzz", "seq": seq, "t_ns": 5}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


def malformed(rng: np.random.Generator, target: str, n: int) -> list[list[bytes]]:
    """n malformed messages for an endpoint taking `target` messages ("frame", "scored" or "result")."""
    pix = bytes(12)  # [2, 2, 3] uint8
    frame = dict(shape=[2, 2, 3], dtype="uint8", encoding="raw", meta={})
    makers = [
        lambda s: [rng.bytes(int(rng.integers(1, 200)))],  # random bytes
        lambda s: [b"\x85\xa1v\x01"],  # truncated msgpack map
        lambda s: [msgpack.packb([1, target, "fuzz", s]), pix],  # a list, not a map
        lambda s: [msgpack.packb("just a string")],
        lambda s: [b"\x00" * (wire.MAX_HEADER_BYTES + 1)],  # header over the limit
        lambda s: [_header(target, s, v=2, **frame), pix],  # another version
        lambda s: [_header(target, s, v=True, **frame), pix],  # a bool is not a version
        lambda s: [_header("teleport", s, **frame), pix],  # unknown kind
        lambda s: [_header(target, s, **frame, colour="red"), pix],  # unknown field
        lambda s: [_header(target, -1 - s, **frame), pix],  # negative seq
        lambda s: [_header(target, 1e30, **frame), pix],  # an enormous seq, as a float
        lambda s: [_header(target, s, stream="", **frame), pix],  # empty stream
        lambda s: [_header(target, s, stream="\u202e\u0000\U0001f4a5", **{**frame, "shape": [2, 2, 7]}), pix],
        lambda s: [_header(target, s, **{**frame, "meta": {"k": "x" * wire.MAX_HEADER_BYTES}}), pix],  # oversized meta
        lambda s: [_header(target, s, **{**frame, "meta": {1: "int key"}}), pix],
    ]
    if target == "frame":
        makers += [
            lambda s: [_header("frame", s, **frame), pix[:-1]],  # payload one byte short
            lambda s: [_header("frame", s, **{**frame, "shape": [16384, 16384, 3]}), pix],  # huge declared size
            lambda s: [_header("frame", s, **{**frame, "shape": [0, 2, 3]}), b""],
            lambda s: [_header("frame", s, **{**frame, "dtype": "float32"}), pix * 4],
            lambda s: [_header("frame", s, **{**frame, "dtype": "uint16"}), pix],
            lambda s: [_header("frame", s, **{**frame, "encoding": "webp"}), pix],
            lambda s: [_header("frame", s, **frame)],  # no payload
            lambda s: [_header("frame", s, **frame), pix, pix],  # one payload too many
            lambda s: [_header("frame", s, **{**frame, "shape": [9000, 9000, 1], "encoding": "png"}),
                       _png_claiming(9000, 9000)],  # a bomb: 81 megapixels in 60 bytes
            lambda s: [_header("frame", s, **{**frame, "shape": [64, 64, 3], "encoding": "png"}),
                       _png_claiming(64, 64)[:30]],  # truncated png
            lambda s: [_header("frame", s, **{**frame, "shape": [8, 8, 3], "encoding": "jpeg"}), rng.bytes(40)],
            lambda s: [_header("frame", s, **{**frame, "shape": [40, 40, 3], "encoding": "png"}),
                       _png_claiming(64, 64)],  # the file disagrees with the header
        ]
    if target == "scored":
        grid = np.zeros((4, 4), np.float32).tobytes()
        sc = dict(shape=[8, 8, 3], meta={}, score=0.1, grid=[4, 4], timing={})
        makers += [
            lambda s: [_header("scored", s, **sc), grid[:-4]],
            lambda s: [_header("scored", s, **{**sc, "grid": [4, 4], "canvas": [32, 32]}), grid],
            lambda s: [_header("scored", s, **{**sc, "score": "high"}), grid],
            lambda s: [_header("scored", s, **{**sc, "grid": [100000, 4]}), grid],
            lambda s: [_header("frame", s, **frame), pix],  # a frame is not for a postprocess worker
        ]
    if target == "result":
        makers += [
            lambda s: [_header("result", s, verdict="maybe")],
            lambda s: [_header("result", s, verdict="error")],  # an error without its message
            lambda s: [_header("result", s, verdict="ok", regions=[{"bbox": [1, 2]}])],
            lambda s: [_header("result", s, verdict="defect", map_shape=[4, 4]), b"\x00" * 15],
            lambda s: [_header("eos", ..., count=-3)],
            lambda s: [_header("frame", s, **frame), pix],  # a frame is not for the sink
        ]
    return [makers[int(i) % len(makers)](1000 + int(i)) for i in rng.permutation(n)]


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _socket(ctx, kind, bind=None, connect=None):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    s.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
    if bind:
        s.bind(bind)
    if connect:
        s.connect(connect)
    return s


def _wait_ready(control, run):
    deadline = time.monotonic() + TIMEOUT_S
    while not control.poll(100):
        assert run.thread.is_alive() and time.monotonic() < deadline, "stage did not start"
    assert wire.decode(control.recv_multipart()).event == "ready"


def _interleave(rng, bad, good):
    order = [("bad", m) for m in bad] + [("good", m) for m in good]
    return [order[i] for i in rng.permutation(len(order))]


def test_inference_worker_survives_hostile_frames(fitted_model, tmp_path, ctx):
    from engines.runtimes import Deployment

    rng = np.random.default_rng(1)
    bad = malformed(rng, "frame", N_BAD)
    good = [wire.encode_frame("ok", i, rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
                              meta={"error": "only data"} if i % 3 == 0 else {}) for i in range(24)]
    frames, out, control = (f"ipc://{tmp_path}/{n}" for n in ("frames", "out", "control"))
    push, pull, ctl = _socket(ctx, zmq.PUSH, bind=frames), _socket(ctx, zmq.PULL, bind=out), _socket(ctx, zmq.PULL,
                                                                                                         bind=control)
    stop = threading.Event()
    run = Background(inference_worker, fitted_model, [frames], [out], deployment=Deployment(threads=1), batch=4,
                     control=control, stop=stop)
    try:
        _wait_ready(ctl, run)
        for _, message in _interleave(rng, bad, good):
            push.send_multipart(message)
        # messages are handled in order: when this last frame's answer comes, every malformed one was counted
        push.send_multipart(wire.encode_frame("ok", len(good), np.zeros((40, 56, 3), np.uint8)))
        answers = {}
        while ("ok", len(good)) not in answers:
            assert pull.poll(int(TIMEOUT_S * 1000)), f"only {len(answers)} answers"
            m = wire.decode(pull.recv_multipart())
            answers[(m.stream, m.seq)] = m
    finally:
        stop.set()
        stats = run.finish()
    assert all(isinstance(answers[("ok", i)], wire.Scored) for i in range(len(good)))  # every valid frame scored
    assert sum(stats.rejected.values()) == len(bad)  # every malformed one counted, once
    assert set(stats.rejected) <= set(wire.REASONS)
    attributable = [m for k, m in answers.items() if k[0] == "fuzz"]
    assert all(isinstance(m, wire.Result) and m.verdict == "error" and m.error.startswith("rejected:")
               for m in attributable)


def test_postprocess_worker_survives_hostile_scored_messages(fitted_model, tmp_path, ctx):
    rng = np.random.default_rng(2)
    bad = malformed(rng, "scored", N_BAD)
    frame = wire.decode([bytes(p) for p in wire.encode_frame("ok", 0, np.zeros((16, 16, 3), np.uint8))])
    good = []
    for i in range(20):
        f = wire.Frame("ok", i, 1, frame.shape, "uint8", "raw", frame.payload)
        good.append(wire.encode_scored(f, 0.0, np.zeros((16, 16), np.float32), None, {}))
    inp, sink, control = (f"ipc://{tmp_path}/{n}" for n in ("in", "sink", "control"))
    pull, ctl = _socket(ctx, zmq.PULL, bind=sink), _socket(ctx, zmq.PULL, bind=control)
    stop = threading.Event()
    run = Background(postprocess_worker, fitted_model, inp, sink, control=control, stop=stop)
    try:
        _wait_ready(ctl, run)
        push = _socket(ctx, zmq.PUSH, connect=inp)
        for _, message in _interleave(rng, bad, good):
            push.send_multipart(message)
        # handled in order: when this last message's result comes, every malformed one was counted
        last = wire.Frame("ok", len(good), 1, frame.shape, "uint8", "raw", frame.payload)
        push.send_multipart(wire.encode_scored(last, 0.0, np.zeros((16, 16), np.float32), None, {}))
        got = set()
        while ("ok", len(good)) not in got:
            assert pull.poll(int(TIMEOUT_S * 1000)), f"only {len(got)} results"
            r = wire.decode(pull.recv_multipart())
            got.add((r.stream, r.seq))
    finally:
        stop.set()
        stats = run.finish()
    assert {s for st, s in got if st == "ok"} == set(range(len(good) + 1))
    assert sum(stats.rejected.values()) == len(bad) and set(stats.rejected) <= set(wire.REASONS)


def test_sink_survives_hostile_results(tmp_path, ctx):
    rng = np.random.default_rng(3)
    bad = malformed(rng, "result", N_BAD)
    good = [wire.encode_result(wire.Result("ok", i, 1, "ok", 0.1)) for i in range(30)]
    results = f"ipc://{tmp_path}/results"
    jsonl = tmp_path / "r.jsonl"
    stop = threading.Event()
    run = Background(run_sink, results, jsonl=jsonl, streams=1, drain_timeout=30.0, stop=stop)
    try:
        push = _socket(ctx, zmq.PUSH, connect=results)
        for _, message in _interleave(rng, bad, good):
            push.send_multipart(message)
        push.send_multipart(wire.encode_eos("ok", len(good)))
        summary = run.finish(TIMEOUT_S)
    finally:
        stop.set()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["seq"] for r in lines if r["stream"] == "ok"] == list(range(len(good)))  # every valid one, in order
    assert not [r for r in lines if r["stream"] == "fuzz"]  # nothing malformed was logged
    assert sum(summary["rejected"].values()) == len(bad) and set(summary["rejected"]) <= set(wire.REASONS)
