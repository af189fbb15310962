"""`lineguard run`: a whole topology on one machine, each stage its own process over ipc.

    producer -> inference worker(s) -> postprocess worker(s) -> sink

Every stage is the same command a user can start alone on another host (`lineguard produce`,
`worker`, `postprocess`, `sink` with tcp:// endpoints). The supervisor waits for every stage's
"ready" on its control socket before the producer starts (a handshake, no sleeps), shows a live
status line, restarts any inference worker, postprocess worker or sink that dies (the producer
sends again every frame the sink has not acknowledged, the restarted sink resumes its log), and
at the end of the stream stops every process it started. Ctrl-C ends the streams: no new frames,
every frame sent is still finished and logged, then the summary; a second Ctrl-C, SIGTERM or a
closed terminal (SIGHUP) stops at once.
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
import urllib.parse
import time
from pathlib import Path
from typing import Callable

import zmq

from calibration.artifact import load_manifest
from engines.compiled import sha256
from engines.errors import ConfigError, LineguardError
from engines.runtimes import Deployment, runtime, usable_cores
from pipeline import wire
from pipeline.metrics import stage_metrics


class RunError(LineguardError):
    """A stage of the pipeline failed to start or died."""


MODES = (None, "lossless", "live")
IN_FLIGHT_BATCHES = 8  # per inference worker: a producer's window (Product.window)


@dataclasses.dataclass(frozen=True)
class Product:
    """One product's model and the workers that serve it: workers / post_workers: process counts
    (workers 0, the default: chosen by the line, `auto_workers`); batch, batch_ms: dynamic batching;
    deployment.threads: per inference worker (None: the cores shared among every inference worker
    of the line)."""

    name: str
    model: Path
    workers: int = 0
    post_workers: int = 1
    batch: int = 8
    batch_ms: float = 10.0
    deployment: Deployment = Deployment()

    def __post_init__(self):
        if self.workers < 0 or self.post_workers < 1 or self.batch < 1 or self.batch_ms < 0:
            raise ConfigError("post-workers and batch must be >= 1, workers >= 0 (0: auto) and batch-ms >= 0")

    @property
    def window(self) -> int:
        """Frames a stream of this product may have awaiting their verdicts (the producer's window):
        IN_FLIGHT_BATCHES batches per inference worker, enough that none waits for work (a batch
        being scored, one queued, the postprocess and the sink's 0.2 s acknowledgements behind) and
        few enough that a stalled or restarted stage cannot pile up more than a second or two of frames."""
        return IN_FLIGHT_BATCHES * self.batch * max(1, self.workers)


MAX_AUTO_WORKERS = 8


def auto_workers(deployment: Deployment, cpu_products: int, cores: int | None = None) -> int:
    """Inference workers for a product given none: one for a GPU device; on the CPU one worker per
    `deployment.threads` cores (one per core when threads is unset; the cores this process may use,
    `usable_cores`: a container's CPU quota, not the host's cores), the cores split among the line's
    CPU products, at most MAX_AUTO_WORKERS. One single-threaded worker per core beat one worker on
    every core by 1.06-1.19x end to end on 2 cores (bench/results/e2e-*.json, "2-workers"): the
    decode, the Python steps and the search run side by side instead of in turn."""
    if deployment.device != "cpu":
        return 1
    cores = max(1, (cores or usable_cores()) // max(1, cpu_products))
    return max(1, min(MAX_AUTO_WORKERS, cores // (deployment.threads or 1)))


@dataclasses.dataclass(frozen=True)
class Stream:
    """One camera or file source: its name (the wire's stream), source spec, product, frames to take
    (0: all), mode (lossless | live; None: by source), camera settings (genicam sources: k=v,...)."""

    name: str
    source: str
    product: str
    frames: int = 0
    mode: str | None = None
    camera: str = ""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("a stream needs a name")
        if "=" in self.name:  # the sink takes its model as STREAM=MODEL
            raise ConfigError(f"stream name {self.name!r} contains '='; name it without one (e.g. "
                              f"{self.name.replace('=', '-')!r})")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; valid modes: lossless, live")
        if self.frames < 0:
            raise ConfigError(f"frames {self.frames} must be >= 0 (0: all)")
        from pipeline.genicam import parse_settings

        parse_settings(self.camera)


@dataclasses.dataclass(frozen=True)
class Line:
    """Everything one supervisor runs: products (models and their workers), streams (each routed to
    its product's workers), and one sink for all. retry_after: seconds without a verdict before a
    producer sends a frame again; respawn: restart inference workers, postprocess workers and the
    sink that die; metrics_port: Prometheus endpoints from this port up (pipeline.metrics)."""

    products: tuple[Product, ...]
    streams: tuple[Stream, ...]
    out: Path | None = None
    pub: str | None = None
    drain_timeout: float = 5.0
    retry_after: float = 10.0
    overlays: bool = True
    respawn: bool = True
    ready_timeout: float = 120.0
    metrics_port: int | None = None
    view_port: int | None = None

    def __post_init__(self):
        cpu_products = sum(p.deployment.device == "cpu" for p in self.products)
        object.__setattr__(self, "products", tuple(  # workers 0: auto, resolved here once for every stage
            p if p.workers else dataclasses.replace(p, workers=auto_workers(p.deployment, cpu_products))
            for p in self.products))
        names = [p.name for p in self.products]
        streams = [s.name for s in self.streams]
        for what, given in (("product", names), ("stream", streams)):
            if not given:
                raise ConfigError(f"a line needs at least one {what}")
            twice = sorted({n for n in given if given.count(n) > 1})
            if twice:
                raise ConfigError(f"{what} names must differ: {', '.join(map(repr, twice))} given more than once")
        for stream in self.streams:
            if stream.product not in names:
                raise ConfigError(f"stream {stream.name!r}: product {stream.product!r} is not one of the line's "
                                  f"products ({', '.join(names)})")
        if self.retry_after <= 0 or self.drain_timeout <= 0:
            raise ConfigError("--retry-after and --drain-timeout must be > 0 seconds")
        if self.metrics_port is not None:
            last = self.metrics_port + self.ports_needed - 1
            if not (0 < self.metrics_port and last < 65536):
                raise ConfigError(f"--metrics-port {self.metrics_port}: the run needs ports {self.metrics_port}..{last}, "
                                  "all within 1..65535")

    @property
    def ports_needed(self) -> int:
        """The run, the sink, a producer per stream, then each product's postprocess and inference workers."""
        return 2 + len(self.streams) + sum(p.post_workers + p.workers for p in self.products)

    def product(self, name: str) -> Product:
        return next(p for p in self.products if p.name == name)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One stream of one model (`lineguard run MODEL`): the line of a single product; the fields are
    those of Product, Stream and Line."""

    model: Path
    source: str = "synthetic"
    out: Path | None = None
    frames: int = 0
    workers: int = 0
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
    view_port: int | None = None
    camera: str = ""

    def __post_init__(self):
        self.line()  # validates

    def line(self) -> Line:
        product = Product("product", Path(self.model), self.workers, self.post_workers, self.batch, self.batch_ms,
                          self.deployment)
        return Line((product,), (Stream(self.stream, self.source, "product", self.frames, self.mode, self.camera),),
                    self.out,
                    self.pub, self.drain_timeout, self.retry_after, self.overlays, self.respawn, self.ready_timeout,
                    self.metrics_port, self.view_port)


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage process of a run: role (sink, producer, post, infer), its product or stream, its index."""

    role: str
    unit: str = ""
    index: int = 0


SUPERVISOR_ENV = "LINEGUARD_SUPERVISOR"  # set by `lineguard run` for its stages: the supervisor's pid


def follow_supervisor() -> None:
    """In a stage `lineguard run` started: ask Linux for SIGTERM when the supervisor dies, however it dies
    (SIGKILL, the OOM killer), so no orphaned stage keeps a camera open, a port bound or a GPU's memory.
    A stage whose supervisor is already gone stops now. Elsewhere (not Linux, or a stage started alone)
    it does nothing."""
    supervisor = os.environ.pop(SUPERVISOR_ENV, None)  # for this process, not for any it starts
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(supervisor):  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


IPC_NAME_MAX = 16  # the longest endpoint name a Supervisor makes ("post-12-345" and the like)


def ipc_folder(bases: tuple[str, ...] | None = None) -> Path:
    """A new private folder for a run's ipc sockets and logs, whose socket paths fit a Unix socket address
    (zmq.IPC_PATH_MAX_LEN: 107 bytes on Linux): under the temporary folder (TMPDIR), or /tmp or /dev/shm
    where that path is too long (a deep TMPDIR would otherwise fail the first bind)."""
    limit = getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107
    bases = bases or (tempfile.gettempdir(), "/tmp", "/dev/shm")
    for base in bases:
        longest = Path(base) / "lineguard-run-12345678" / ("x" * IPC_NAME_MAX)  # mkdtemp adds 8 characters
        if len(str(longest).encode()) <= limit and Path(base).is_dir() and os.access(base, os.W_OK | os.X_OK):
            return Path(tempfile.mkdtemp(prefix="lineguard-run-", dir=base))
    raise ConfigError(f"no writable temporary folder is short enough for the run's ipc sockets ({limit} bytes a "
                      f"path): tried {', '.join(bases)}; set TMPDIR to a short folder, e.g. TMPDIR=/tmp")


MAX_START_FAILURES = 3  # restarts of one stage in a row that die before they are ready: the run fails


def model_id(model: Path) -> str:
    """What identifies a model folder's contents: its manifest's hash (the manifest holds every file's);
    "" where there is none."""
    try:
        return sha256(Path(model) / "manifest.json")
    except OSError:
        return ""


class Supervisor:
    """Starts, watches and stops the stage processes of one line."""

    def __init__(self, line: Line, frame_sizes: dict[str, int], status: Callable[[dict], None] | None = None):
        self.line = line
        self.frame_sizes = frame_sizes  # product -> the side of its synthetic frames (its typical training frame)
        self.status = status
        self.tmp = ipc_folder()
        self.cores = usable_cores()  # what the inference workers' threads share (`worker_threads`)
        self.procs: dict[str, subprocess.Popen] = {}
        self.stages: dict[str, Stage] = {}
        self.logs: dict[str, Path] = {}
        self.stats: dict[str, dict] = {}
        self.restarts: list[dict] = []
        self.stop = threading.Event()
        self.ending = False  # the streams were ended on request (`end_streams`)
        self.spawned: dict[str, int] = {}  # product -> inference workers started so far (names of new ones)
        self.ready: set[str] = set()  # stages that said "ready" since they were (last) started
        self.start_failures: dict[Stage, int] = {}  # restarts in a row that died before they were ready
        self.model_ids = {p.name: model_id(p.model) for p in line.products}  # what a restart must find again
        self.ports = self._ports()
        self.metrics = stage_metrics("run", "run", line.metrics_port)
        self.single = len(line.products) == 1

    def _ports(self) -> dict[Stage, int]:
        """Each stage's metrics port, in pipeline.metrics' order (an inference worker's slot keeps its port)."""
        if self.line.metrics_port is None:
            return {}
        order = [Stage("sink")] + [Stage("producer", s.name) for s in self.line.streams]
        for p in self.line.products:
            order += [Stage("post", p.name, i) for i in range(p.post_workers)]
            order += [Stage("infer", p.name, i) for i in range(p.workers)]
        return {stage: self.line.metrics_port + 1 + i for i, stage in enumerate(order)}

    def port(self, stage: Stage) -> list[str]:
        return ["--metrics-port", str(self.ports[stage])] if stage in self.ports else []

    def name(self, role: str, unit: str, index: int) -> str:
        """Stage names: infer0, post0, producer for one product and stream; product- / -stream prefixed otherwise."""
        if role == "producer":
            return "producer" if len(self.line.streams) == 1 else f"producer-{unit}"
        return f"{role}{index}" if self.single else f"{unit}-{role}{index}"

    def endpoint(self, name: str) -> str:
        """An ipc endpoint in the run's folder. Names are short and made of indices, never of the user's
        product or stream names, so every socket path fits IPC_NAME_MAX (`ipc_folder`)."""
        return f"ipc://{self.tmp / name}"

    def frames_endpoint(self, stream: Stream) -> str:
        return self.endpoint(f"frames-{self.line.streams.index(stream)}")

    def post_endpoint(self, product: Product, i: int) -> str:
        return self.endpoint(f"post-{self.line.products.index(product)}-{i}")

    def spawn(self, name: str, stage: Stage, args: list[str]) -> None:
        self.ready.discard(name)
        log = self.tmp / f"{urllib.parse.quote(name, safe='')}.log"  # a product or stream name may hold a '/'
        self.logs[name] = log
        self.stages[name] = stage
        with open(log, "wb") as f:
            # a process group of its own: a terminal's Ctrl-C reaches the supervisor alone, which ends the
            # streams and lets every stage finish what was accepted (`end_streams`)
            # and it ends with the supervisor, however that ends (`follow_supervisor`)
            # SIGINT blocked until the stage's own handler is in place (`stop_on_signals` unblocks it): a
            # Ctrl-C's ending that reaches a producer still starting is kept for it, not its death
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                self.procs[name] = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=f,
                                                    stdin=subprocess.DEVNULL, process_group=0,
                                                    env={**os.environ, SUPERVISOR_ENV: str(os.getpid())})
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def log_tail(self, name: str) -> str:
        lines = self.logs[name].read_text(errors="replace").strip().splitlines()
        errors = [l for l in lines if l.startswith("lineguard: error")]
        return (errors or lines or ["(no output)"])[-1]

    def spawn_worker(self, product: Product, slot: int) -> None:
        n = self.spawned.get(product.name, 0)
        self.spawned[product.name] = n + 1
        name = self.name("infer", product.name, n)
        deployment = dataclasses.replace(product.deployment, threads=self.worker_threads(product)).to_json()
        # the deployment crosses the process boundary as its JSON
        args = ["worker", str(product.model), "--deployment", deployment, "--batch-size", str(product.batch),
                "--batch-ms", str(product.batch_ms), "--control", self.endpoint("control"), "--name", name,
                *self.port(Stage("infer", product.name, slot))]
        for stream in self.line.streams:
            if stream.product == product.name:
                args += ["--frames", self.frames_endpoint(stream)]
        for i in range(product.post_workers):
            args += ["--out", self.post_endpoint(product, i)]
        self.spawn(name, Stage("infer", product.name, slot), args)

    def worker_threads(self, product: Product) -> int:
        """Each inference worker's threads: its deployment's, or the usable cores shared among every
        inference worker of the line."""
        workers = sum(p.workers for p in self.line.products)
        return product.deployment.threads or max(1, self.cores // workers)

    def plan(self) -> str:
        """One line for the user: what runs where, as chosen (worker counts and threads, runtime)."""
        parts = []
        for p in self.line.products:
            d, threads = p.deployment, self.worker_threads(p)
            parts.append(f"{'' if self.single else p.name + ': '}{p.workers} inference worker{'s' * (p.workers > 1)} "
                         f"of {threads} thread{'s' * (threads > 1)} ({d.runtime} {d.precision} on {d.device}), "
                         f"{p.post_workers} postprocess")
        return f"lineguard run: {'; '.join(parts)}; {self.cores} usable CPU cores"

    def sink_args(self, resume: bool = False) -> list[str]:
        c = self.line
        args = ["sink", "--results", self.endpoint("results"), "--streams", str(len(c.streams)), "--acks",
                self.endpoint("acks"), "--drain-timeout", str(c.drain_timeout), "--summary",
                str(self.tmp / "summary.json"), "--control", self.endpoint("control"), *self.port(Stage("sink"))]
        for stream in c.streams:
            args += ["--model", f"{stream.name}={c.product(stream.product).model}"]
        if c.out is not None:
            args += ["--jsonl", str(c.out / "results.jsonl"), "--maps", str(c.out / "maps")]
        if c.pub:
            args += ["--pub", c.pub]
        if c.view_port is not None:
            args += ["--view-port", str(c.view_port)]
            if c.out is not None and c.overlays:
                args += ["--overlays", str(c.out / "overlays")]
        return args + (["--resume"] if resume else [])

    def spawn_post(self, product: Product, i: int) -> None:
        c = self.line
        name = self.name("post", product.name, i)
        args = ["postprocess", str(product.model), "--in", self.post_endpoint(product, i), "--sink",
                self.endpoint("results"), "--control", self.endpoint("control"), "--name", name,
                *self.port(Stage("post", product.name, i))]
        if c.out is not None and c.overlays:
            args += ["--overlays", str(c.out / "overlays")]
        self.spawn(name, Stage("post", product.name, i), args)

    def spawn_producer(self, stream: Stream) -> None:
        c = self.line
        args = ["produce", stream.source, "--frames-endpoint", self.frames_endpoint(stream), "--sink",
                self.endpoint("results"), "--acks", self.endpoint("acks"), "--retry-after", str(c.retry_after),
                "--window", str(c.product(stream.product).window), "--stream", stream.name,
                "--frames", str(stream.frames), "--size", str(self.frame_sizes[stream.product]),
                "--hold", "86400", *self.port(Stage("producer", stream.name))]  # stopped once the sink has all
        if stream.mode:
            args += ["--mode", stream.mode]
        if stream.camera:
            args += ["--camera", stream.camera]
        self.spawn(self.name("producer", stream.name, 0), Stage("producer", stream.name), args)

    def run(self) -> dict:
        ctx = zmq.Context()
        control = ctx.socket(zmq.PULL)
        control.bind(self.endpoint("control"))
        print(self.plan(), file=sys.stderr, flush=True)
        try:
            self.spawn("sink", Stage("sink"), self.sink_args())
            for product in self.line.products:
                for i in range(product.post_workers):
                    self.spawn_post(product, i)
                for slot in range(product.workers):
                    self.spawn_worker(product, slot)
            self.wait_ready(control, set(self.procs))
            for stream in self.line.streams:
                self.spawn_producer(stream)
            return self.watch(control)
        finally:
            control.close(linger=0)
            ctx.term()
            self.shutdown()

    def end_streams(self) -> None:
        """Ctrl-C: the producers take no more frames and end their streams; every frame already sent is
        still scored, postprocessed and logged, and the run ends with its summary. A second Ctrl-C, or
        one before any frame was sent, stops at once."""
        if self.ending:
            self.stop.set()
            return
        self.ending = True  # first: a second SIGINT arriving while this one is handled stops
        producers = [p for n, p in self.procs.items() if self.stages[n].role == "producer" and p.poll() is None]
        if not producers:
            self.stop.set()
            return
        for proc in producers:
            proc.send_signal(signal.SIGINT)
        print("\nlineguard: ending: no new frames; the frames in flight are being finished (Ctrl-C again stops now)",
              file=sys.stderr, flush=True)

    def wait_ready(self, control: zmq.Socket, names: set[str]) -> None:
        waiting = set(names)
        deadline = time.monotonic() + self.line.ready_timeout
        while waiting:
            if self.stop.is_set():
                raise KeyboardInterrupt
            for name in list(waiting):
                if self.procs[name].poll() is not None:
                    raise RunError(f"{name} exited while starting: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RunError(f"{', '.join(sorted(waiting))} not ready after {self.line.ready_timeout:g} s; a slow "
                               "machine may need longer: --ready-timeout (a line file's ready_timeout)")
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
        if msg.event == "ready":
            self.ready.add(msg.name)
        elif msg.event == "stats":
            self.stats[msg.name] = msg.data
        elif msg.event == "status" and self.status is not None:
            self.status(msg.data)
        return msg

    def respawn(self, name: str, proc: subprocess.Popen) -> None:
        """Record a stage that died and start it again (the sink resumes its log)."""
        stage = self.stages[name]
        self.restarts.append({"stage": name, "exit_code": proc.returncode, "t": time.time()})
        self.metrics.count("restarts", "stages restarted after they died", stage=stage.role)
        if not self.line.respawn:
            raise RunError(f"{name} died (exit {proc.returncode}: {self.log_tail(name)}) and restarts are off "
                           "(--no-respawn)")
        failures = self.start_failures[stage] = 0 if name in self.ready else self.start_failures.get(stage, 0) + 1
        if failures >= MAX_START_FAILURES:
            raise RunError(f"{name} died {failures} times in a row before it was ready, last with: "
                           f"{self.log_tail(name)}; fix that and run again")
        if stage.role in ("infer", "post") and model_id(self.line.product(stage.unit).model) != self.model_ids[stage.unit]:
            raise RunError(f"the model {self.line.product(stage.unit).model} changed on disk during the run (refitted, "
                           f"moved or removed), so a restarted {name} would decide by another model than the rest "
                           "of the line; run again to serve the model now there")
        del self.procs[name]
        if stage.role == "infer":
            self.spawn_worker(self.line.product(stage.unit), stage.index)
        elif stage.role == "post":
            self.spawn_post(self.line.product(stage.unit), stage.index)
        else:
            self.spawn("sink", stage, self.sink_args(resume=True))

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
            for name, proc in list(self.procs.items()):
                role = self.stages[name].role
                if role == "producer" and proc.poll() not in (None, 0):
                    raise RunError(f"{name} failed: {self.log_tail(name)}")
                if role in ("infer", "post") and proc.poll() is not None:
                    self.respawn(name, proc)
        while control.poll(100):  # the sink's last stats may still be queued
            self._control(control)
        summary = json.loads((self.tmp / "summary.json").read_text())
        rejected = dict(summary.get("rejected", {}))
        for name, data in self.stats.items():
            if self.stages.get(name, Stage("")).role in ("infer", "post"):
                for reason, n in data.get("rejected", {}).items():
                    rejected[reason] = rejected.get(reason, 0) + n
        summary["rejected"] = rejected
        summary["restarts"] = self.restarts
        summary["ended_on_request"] = self.ending
        summary["config"] = json.loads(json.dumps(dataclasses.asdict(self.line), default=str))
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


def run_pipeline(config: RunConfig | Line, status: Callable[[dict], None] | None = None) -> dict:
    """Run a line (or one stream of one model) until every source ends (or Ctrl-C / SIGTERM); the sink's summary."""
    from calibration.kinds import get_kind
    from engines.compiled import engine_file
    from pipeline.producers import check_source

    line = config.line() if isinstance(config, RunConfig) else config
    sizes = {}
    for product in line.products:  # a bad model, engine or source: one clear error here, not a dead stage later
        manifest = load_manifest(product.model)
        sizes[product.name] = manifest.get("frame", [manifest["input"]["height"]])[0]
        d = product.deployment
        if d.precision in runtime(d.runtime).compiled:  # an engine `lineguard export` builds: there and valid here
            for part in get_kind(manifest["kind"]).parts(product.model, manifest):
                engine_file(part, d)
    for stream in line.streams:
        check_source(stream.source)
    if line.out is not None:
        line.out.mkdir(parents=True, exist_ok=True)
        for earlier in ("maps", "overlays"):  # an earlier run's: its defect frames are not this run's
            shutil.rmtree(line.out / earlier, ignore_errors=True)
    from pipeline.workers import SIGNAL_ACTIONS

    supervisor = Supervisor(line, sizes, status)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: SIGNAL_ACTIONS(supervisor.end_streams))
        for sig in (signal.SIGTERM, signal.SIGHUP):  # the stages are in their own process groups: a closed
            if signal.getsignal(sig) is not signal.SIG_IGN:  # terminal must stop them too, unless under nohup
                previous[sig] = signal.signal(sig, lambda *_: SIGNAL_ACTIONS(supervisor.stop.set))
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
