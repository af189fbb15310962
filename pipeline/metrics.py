"""Prometheus metrics of one stage process (prometheus_client, a registry of its own), served over
HTTP at http://HOST:PORT/metrics when the stage is given a port.

Every stage counts what it handles (counters end in `_total`, durations are histograms in
seconds); `lineguard_stage_info` names the stage, its model and the lineguard version.

    stage          metrics
    producer       frames_sent, frames_dropped, frames_resent, frames_abandoned (stream); unacknowledged_frames
    worker         frames_scored, errors, rejected (reason); batch_size; step_seconds (step: preprocess,
                   infer); queue_seconds (frame creation to the worker)
    postprocess    frames_decided (verdict); errors, rejected (reason); step_seconds (step: post)
    sink           results (stream, verdict), lost, late, duplicates (stream), dropped_frames (stream,
                   as the producer reported), rejected (reason); latency_seconds (stream: frame
                   creation to the sink); waiting_results (stream: held for ordering)
    run            restarts (stage): the supervisor of `lineguard run`

`lineguard run --metrics-port P` serves the supervisor on P, the sink on P + 1, the producer on
P + 2, postprocess worker i on P + 3 + i and inference worker slot j after them (a restarted
worker takes its slot's port). Standalone stages take `--metrics-port`.
"""

from __future__ import annotations

from engines.errors import ConfigError

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """One stage's metrics; each call is cheap enough for every frame. Metrics are made on first use
    (name, help and label names fixed by that use), so a stage exposes only what it counts."""

    def __init__(self, role: str, name: str, port: int | None = None, model: str = "", kind: str = ""):
        try:
            import prometheus_client
        except ImportError as exc:  # a dependency: only a broken install lacks it
            raise ConfigError("prometheus_client is not installed; pip install -c constraints.txt -e .") from exc
        from importlib.metadata import version

        self._client = prometheus_client
        self.registry = prometheus_client.CollectorRegistry()
        self._metrics: dict[str, object] = {}
        self._server = None
        info = prometheus_client.Gauge("lineguard_stage_info", "the stage, its model and the lineguard version",
                                       ["role", "name", "model", "kind", "version"], registry=self.registry)
        info.labels(role, name, model, kind, version("lineguard")).set(1)
        if port is not None:
            if not 0 < port < 65536:
                raise ConfigError(f"--metrics-port {port} is not a TCP port (1..65535)")
            try:
                self._server, _ = prometheus_client.start_http_server(port, registry=self.registry)
            except OSError as exc:
                raise ConfigError(f"--metrics-port {port}: cannot listen ({exc.strerror}); choose a free port") from exc

    def _get(self, kind: str, name: str, doc: str, labels: tuple[str, ...], **extra):
        metric = self._metrics.get(name)
        if metric is None:
            cls = getattr(self._client, kind)
            metric = self._metrics[name] = cls(f"lineguard_{name}", doc, labels, registry=self.registry, **extra)
        return metric

    def count(self, name: str, doc: str, n: float = 1, **labels: str) -> None:
        """Add n to the counter lineguard_<name>_total{labels}."""
        metric = self._get("Counter", name, doc, tuple(labels))
        (metric.labels(**labels) if labels else metric).inc(n)

    def set(self, name: str, doc: str, value: float, **labels: str) -> None:
        """Set the gauge lineguard_<name>{labels}."""
        metric = self._get("Gauge", name, doc, tuple(labels))
        (metric.labels(**labels) if labels else metric).set(value)

    def observe(self, name: str, doc: str, value: float, buckets=STEP_BUCKETS, **labels: str) -> None:
        """Observe value in the histogram lineguard_<name>{labels}."""
        metric = self._get("Histogram", name, doc, tuple(labels), buckets=buckets)
        (metric.labels(**labels) if labels else metric).observe(value)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class NoMetrics:
    """A stage without a metrics port counts nothing."""

    def count(self, *args, **labels) -> None:
        pass

    def set(self, *args, **labels) -> None:
        pass

    def observe(self, *args, **labels) -> None:
        pass

    def close(self) -> None:
        pass


def stage_metrics(role: str, name: str, port: int | None, model=None) -> Metrics | NoMetrics:
    """Metrics served on `port` (None: NoMetrics), labelled with the stage's calibration.model.Model
    (its directory and kind), which the stage has loaded and validated already."""
    if port is None:
        return NoMetrics()
    return Metrics(role, name, port, "" if model is None else str(model.dir), "" if model is None else model.kind.name)
