"""CURVE between standalone stages on tcp (pipeline/security.py): known keys get through, unknown ones are
refused and counted; a producer that is not the line's cannot get a frame scored, a sender that is not
the line's cannot get a result logged."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import zmq
import zmq.auth

from pipeline import wire
from pipeline.security import Curve, write_keys
from pipeline.sinks import run_sink
from pipeline.workers import inference_worker
from plumbing import TIMEOUT_S, Background


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    write_keys(folder)
    return folder


def test_keys_are_one_pair_per_role(keys):
    for role in ("producer", "worker", "postprocess", "sink", "client"):
        assert (keys / f"{role}.key").is_file()
        assert (keys / f"{role}.key_secret").stat().st_mode & 0o077 == 0  # the secret is the owner's only


def _client(ctx, kind, secret_file, server_public, endpoint):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.auth.load_certificate(str(secret_file))
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
    sock.connect(endpoint)
    return sock


def test_an_unknown_sender_cannot_get_a_result_logged(keys, tmp_path):
    intruder = tmp_path / "intruder"
    write_keys(intruder, ("intruder",))  # a key pair of its own, not in the line's folder
    port = _port()
    endpoint = f"tcp://127.0.0.1:{port}"
    jsonl = tmp_path / "results.jsonl"
    stop = threading.Event()
    run = Background(run_sink, f"tcp://127.0.0.1:{port}", jsonl=jsonl, streams=0, curve=Curve(keys, "sink"),
                     stop=stop)
    ctx = zmq.Context()
    try:
        sink_public = zmq.auth.load_certificate(str(keys / "sink.key"))[0]
        good = _client(ctx, zmq.PUSH, keys / "postprocess.key_secret", sink_public, endpoint)
        bad = _client(ctx, zmq.PUSH, intruder / "intruder.key_secret", sink_public, endpoint)
        deadline = time.monotonic() + TIMEOUT_S
        forged = wire.encode_result(wire.Result("cam0", 0, 1, "ok", 0.0))  # the forged "ok" of the issue
        real = wire.encode_result(wire.Result("cam0", 0, 2, "defect", 0.9))
        good.send_multipart(real)
        while not (jsonl.is_file() and jsonl.read_text().strip()):
            assert time.monotonic() < deadline, "the authorised result was never logged"
            time.sleep(0.05)
        try:
            bad.send_multipart(forged, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # never connected: the handshake was refused
        time.sleep(0.5)
    finally:
        stop.set()
        summary = run.finish()
        ctx.destroy(linger=0)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["seq"], r["verdict"]) for r in lines] == [(0, "defect")]  # only the authorised sender's result
    assert summary["rejected"].get("unauthorised", 0) >= 1  # the refusal is counted


def test_a_producer_that_is_not_the_lines_gets_nothing_scored(keys, fitted_model, tmp_path):
    from engines.runtimes import Deployment

    rogue_keys = tmp_path / "rogue"
    write_keys(rogue_keys, ("producer",))  # poses as a producer, with a key pair the line does not know
    frames_port, post_port = _port(), _port()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.auth.load_certificate(str(rogue_keys / "producer.key_secret"))
    rogue.curve_publickey, rogue.curve_secretkey, rogue.curve_server = public, secret, True
    rogue.bind(f"tcp://127.0.0.1:{frames_port}")
    scored = ctx.socket(zmq.PULL)  # where the worker's output would arrive (a plain socket: nothing should)
    scored.setsockopt(zmq.LINGER, 0)
    scored.bind(f"tcp://127.0.0.1:{post_port}")
    stop = threading.Event()
    run = Background(inference_worker, fitted_model, [f"tcp://127.0.0.1:{frames_port}"],
                     [f"tcp://127.0.0.1:{post_port}"], deployment=Deployment(threads=1), curve=Curve(keys, "worker"),
                     stop=stop)
    try:
        image = np.zeros((64, 64, 3), np.uint8)
        sent = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                rogue.send_multipart(wire.encode_frame("cam0", sent, image), flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass  # no peer ever completes the handshake: nothing can be queued to it
            time.sleep(0.05)
        assert not scored.poll(500)
    finally:
        stop.set()
        stats = run.finish()
        ctx.destroy(linger=0)
    assert stats.frames == 0
