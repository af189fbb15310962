"""Test-side ZeroMQ plumbing shared by the pipeline tests: sockets that cannot hang a test, and
functions run in a thread that is always joined."""

from __future__ import annotations

import threading
from pathlib import Path

import zmq

TIMEOUT_S = 30.0  # the most any socket operation or thread may take before the test fails instead of hanging


class Net:
    """The test's sockets: one Context, ipc endpoints under tmp_path, timeouts on every socket."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []  # kept open until close(), even when a test drops its reference

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.folder / name}"

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None, hwm: int | None = None):
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
        if hwm is not None:
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.SNDHWM, hwm)
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
        return sock

    def close(self) -> None:
        self.ctx.destroy(linger=0)  # closes whatever a failed test left open: nothing can hang on it


class Background:
    """fn(*args, **kwargs) in a thread; finish() joins it with a timeout and returns its result or raises."""

    def __init__(self, fn, *args, **kwargs):
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread by finish()
            self.error = exc

    def finish(self, timeout: float = TIMEOUT_S):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"thread still running {timeout} s after it should have ended"
        if self.error is not None:
            raise self.error
        return self.result
