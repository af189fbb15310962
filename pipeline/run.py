"""`lineguard run`: a whole topology on one machine, each stage its own process over ipc.

    producer -> inference worker(s) -> postprocess worker(s) -> sink

Every stage is the same command a user can start alone on another host (`lineguard produce`,
`worker`, `postprocess`, `sink` with tcp:// endpoints). The supervisor waits for every stage's
"ready" on its control socket before the producer starts (a handshake, no sleeps), shows a live
status line, restarts any inference worker, postprocess worker or sink that dies (the producer
sends again every frame the sink has not acknowledged, the restarted sink resumes its log), and
on the end of the stream, Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from calibration.artifact import load_manifest
from engines.errors import ConfigError, LineguardError
from engines.runtimes import Deployment
from pipeline import wire
from pipeline.metrics import stage_metrics


class RunError(LineguardError):
    """A stage of the pipeline failed to start or died."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """workers / post_workers: process counts; batch, batch_ms: dynamic batching; threads: per
    inference worker (default: cores / workers); mode: lossless | live (default by source);
    retry_after: seconds without a verdict before the producer sends a frame again; respawn:
    restart inference workers, postprocess workers and the sink that die; metrics_port: Prometheus
    endpoints from this port up (pipeline.metrics says which stage gets which)."""

    model: Path
    source: str = "synthetic"
    out: Path | None = None
    frames: int = 0
    workers: int = 1
    post_workers: int = 1
    batch: int = 8
    batch_ms: float = 10.0
    deployment: Deployment = Deployment()
    mode: str | None = None
    stream: str = "cam0"
    pub: str | None = None
    drain_timeout: float = 5.0
    retry_after: float = 10.0
    overlays: bool = True
    respawn: bool = True
    ready_timeout: float = 120.0
    metrics_port: int | None = None

    def __post_init__(self):
        if self.workers < 1 or self.post_workers < 1 or self.batch < 1 or self.batch_ms < 0:
            raise ConfigError("workers, post-workers and batch must be >= 1 and batch-ms >= 0")
        if self.retry_after <= 0 or self.drain_timeout <= 0:
            raise ConfigError("--retry-after and --drain-timeout must be > 0 seconds")
        last = None if self.metrics_port is None else self.metrics_port + 2 + self.post_workers + self.workers
        if last is not None and not (0 < self.metrics_port and last < 65536):
            raise ConfigError(f"--metrics-port {self.metrics_port}: the run needs ports {self.metrics_port}..{last}, "
                              "all within 1..65535")
        if self.mode not in (None, "lossless", "live"):
            raise ConfigError(f"unknown mode {self.mode!r}; valid modes: lossless, live")


class Supervisor:
    """Starts, watches and stops the stage processes of one run."""

    def __init__(self, config: RunConfig, input_size: int, status: Callable[[dict], None] | None = None):
        self.config = config
        self.input_size = input_size  # the side of synthetic frames: the model's typical training frame
        self.status = status
        self.tmp = Path(tempfile.mkdtemp(prefix="lineguard-run-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.stats: dict[str, dict] = {}
        self.restarts: list[dict] = []
        self.stop = threading.Event()
        self.slots: dict[str, int] = {}  # inference worker name -> its slot (a restarted worker takes the dead one's)
        self.metrics = stage_metrics("run", "run", config.metrics_port, config.model)

    def port(self, offset: int) -> list[str]:
        """--metrics-port for the stage `offset` ports above the run's own, if the run has metrics."""
        return [] if self.config.metrics_port is None else ["--metrics-port", str(self.config.metrics_port + offset)]

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.tmp / name}"

    def spawn(self, name: str, args: list[str]) -> None:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=f,
                                                stdin=subprocess.DEVNULL)

    def log_tail(self, name: str) -> str:
        lines = self.logs[name].read_text(errors="replace").strip().splitlines()
        errors = [l for l in lines if l.startswith("lineguard: error")]
        return (errors or lines or ["(no output)"])[-1]

    def worker_args(self, name: str) -> list[str]:
        c = self.config
        d = c.deployment
        threads = d.threads or max(1, (os.cpu_count() or 1) // c.workers)
        deployment = dataclasses.replace(d, threads=threads).to_json()  # crosses the process boundary as JSON
        args = ["worker", str(c.model), "--frames", self.endpoint("frames"), "--deployment", deployment,
                "--batch-size", str(c.batch), "--batch-ms", str(c.batch_ms),
                "--control", self.endpoint("control"), "--name", name, *self.port(3 + c.post_workers + self.slots[name])]
        for i in range(c.post_workers):
            args += ["--out", self.endpoint(f"post{i}")]
        return args

    def sink_args(self, resume: bool = False) -> list[str]:
        c = self.config
        args = ["sink", "--results", self.endpoint("results"), "--streams", "1", "--acks", self.endpoint("acks"),
                "--drain-timeout", str(c.drain_timeout), "--summary", str(self.tmp / "summary.json"),
                "--control", self.endpoint("control"), "--model", str(c.model), *self.port(1)]
        if c.out is not None:
            args += ["--jsonl", str(c.out / "results.jsonl"), "--maps", str(c.out / "maps")]
        if c.pub:
            args += ["--pub", c.pub]
        return args + (["--resume"] if resume else [])

    def post_args(self, i: int) -> list[str]:
        c = self.config
        args = ["postprocess", str(c.model), "--in", self.endpoint(f"post{i}"), "--sink",
                self.endpoint("results"), "--control", self.endpoint("control"), "--name", f"post{i}", *self.port(3 + i)]
        if c.out is not None and c.overlays:
            args += ["--overlays", str(c.out / "overlays")]
        return args

    def run(self) -> dict:
        c = self.config
        ctx = zmq.Context()
        control = ctx.socket(zmq.PULL)
        control.bind(self.endpoint("control"))
        try:
            self.spawn("sink", self.sink_args())
            for i in range(c.post_workers):
                self.spawn(f"post{i}", self.post_args(i))
            for i in range(c.workers):
                self.slots[f"infer{i}"] = i
                self.spawn(f"infer{i}", self.worker_args(f"infer{i}"))
            self.wait_ready(control, set(self.procs))
            size = self.input_size
            produce = ["produce", c.source, "--frames-endpoint", self.endpoint("frames"), "--sink",
                       self.endpoint("results"), "--acks", self.endpoint("acks"), "--retry-after", str(c.retry_after),
                       "--stream", c.stream, "--frames", str(c.frames), "--size", str(size),
                       "--hold", "86400", *self.port(2)]  # stopped by shutdown() once the sink has every result
            if c.mode:
                produce += ["--mode", c.mode]
            self.spawn("producer", produce)
            return self.watch(control)
        finally:
            control.close(linger=0)
            ctx.term()
            self.shutdown()

    def wait_ready(self, control: zmq.Socket, names: set[str]) -> None:
        waiting = set(names)
        deadline = time.monotonic() + self.config.ready_timeout
        while waiting:
            if self.stop.is_set():
                raise KeyboardInterrupt
            for name in list(waiting):
                if self.procs[name].poll() is not None:
                    raise RunError(f"{name} exited while starting: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RunError(f"{', '.join(sorted(waiting))} not ready after {self.config.ready_timeout:g} s")
            if control.poll(100):
                msg = self._control(control)
                if msg is not None and msg.event == "ready":
                    waiting.discard(msg.name)

    def _control(self, control: zmq.Socket) -> wire.Control | None:
        try:
            msg = wire.decode(control.recv_multipart(copy=False))
        except wire.WireError:
            return None
        if not isinstance(msg, wire.Control):
            return None
        if msg.event == "stats":
            self.stats[msg.name] = msg.data
        elif msg.event == "status" and self.status is not None:
            self.status(msg.data)
        return msg

    def respawn(self, name: str, proc: subprocess.Popen) -> None:
        """Record a stage that died and start it again (the sink resumes its log)."""
        self.restarts.append({"stage": name, "exit_code": proc.returncode, "t": time.time()})
        self.metrics.count("restarts", "stages restarted after they died", stage=name.rstrip("0123456789"))
        if not self.config.respawn:
            raise RunError(f"{name} died (exit {proc.returncode}: {self.log_tail(name)}) and restarts are off "
                           "(--no-respawn)")
        if name.startswith("infer"):
            del self.procs[name]
            new = f"infer{sum(r['stage'].startswith('infer') for r in self.restarts) + self.config.workers - 1}"
            self.slots[new] = self.slots.pop(name)
            self.spawn(new, self.worker_args(new))
        elif name.startswith("post"):
            self.spawn(name, self.post_args(int(name[4:])))
        else:
            self.spawn("sink", self.sink_args(resume=True))

    def watch(self, control: zmq.Socket) -> dict:
        while True:
            sink = self.procs["sink"]
            if sink.poll() is not None:
                if sink.returncode == 0:
                    break
                if self.log_tail("sink").startswith("lineguard: error"):  # not a crash: it cannot run at all
                    raise RunError(f"sink failed: {self.log_tail('sink')}")
                self.respawn("sink", sink)
                continue
            if self.stop.is_set():
                raise KeyboardInterrupt
            if control.poll(200):
                self._control(control)
            producer = self.procs["producer"]
            if producer.poll() not in (None, 0):
                raise RunError(f"producer failed: {self.log_tail('producer')}")
            for name, proc in list(self.procs.items()):
                if name.startswith(("infer", "post")) and proc.poll() is not None:
                    self.respawn(name, proc)
        while control.poll(100):  # the sink's last stats may still be queued
            self._control(control)
        summary = json.loads((self.tmp / "summary.json").read_text())
        rejected = dict(summary.get("rejected", {}))
        for name, data in self.stats.items():
            if name.startswith(("infer", "post")):
                for reason, n in data.get("rejected", {}).items():
                    rejected[reason] = rejected.get(reason, 0) + n
        summary["rejected"] = rejected
        summary["restarts"] = self.restarts
        summary["config"] = json.loads(json.dumps(dataclasses.asdict(self.config), default=str))
        return summary

    def shutdown(self, grace: float = 5.0) -> None:
        """SIGTERM every stage still running, SIGKILL what is left after `grace` seconds; remove the ipc folder."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.metrics.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_pipeline(config: RunConfig, status: Callable[[dict], None] | None = None) -> dict:
    """Run the topology until the source ends (or Ctrl-C / SIGTERM); returns the sink's summary."""
    from pipeline.producers import check_source

    manifest = load_manifest(config.model)  # a bad model or source: one clear error here, not a dead stage later
    check_source(config.source)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(config, manifest.get("frame", [manifest["input"]["height"]])[0], status)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: supervisor.stop.set())
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
