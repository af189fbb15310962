"""Prometheus metrics: a stage's counters scraped over HTTP agree with its own accounting."""

from __future__ import annotations

import random
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines.errors import ConfigError
from pipeline import wire
from pipeline.metrics import Metrics
from pipeline.run import RunConfig, run_pipeline
from pipeline.sinks import Sink


def free_ports(n: int) -> int:
    """A base port P with P .. P + n - 1 all free on this host."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of http://127.0.0.1:port/metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def result(seq: int, verdict: str = "ok", stream: str = "cam0") -> list:
    error = "rejected: broken" if verdict == "error" else None
    return wire.encode_result(wire.Result(stream, seq, time.time_ns() - 20_000_000, verdict,
                                          None if error else 0.2, error=error))


def test_sink_metrics_match_its_summary():
    port = free_ports(1)
    metrics = Metrics("sink", "sink", port)
    sink = Sink(metrics=metrics)
    try:
        for seq, verdict in [(1, "defect"), (0, "ok"), (2, "error"), (3, "ok")]:
            sink.handle(result(seq, verdict))
        sink.handle(result(1, "defect"))  # a duplicate
        sink.handle(result(0, "ok", stream="cam1"))
        sink.handle(wire.encode_eos("cam0", 6, dropped=3))
        sink.handle([b"\xc1 not msgpack"])
        sink.drain("test")  # seqs 4 and 5 of cam0 are lost
        summary = sink.summary()
        samples = scrape(port)
    finally:
        metrics.close()
    for verdict in ("ok", "defect", "error"):
        assert total(samples, "lineguard_results_total", verdict=verdict) == summary[verdict]
    assert total(samples, "lineguard_results_total") == summary["results"] == 7
    assert total(samples, "lineguard_results_total", stream="cam1") == 1
    assert total(samples, "lineguard_lost_total", stream="cam0") == summary["lost"] == 2
    assert total(samples, "lineguard_duplicates_total") == summary["duplicates"] == 1
    assert total(samples, "lineguard_dropped_frames", stream="cam0") == summary["dropped"] == 3
    assert total(samples, "lineguard_rejected_total", reason="not_msgpack") == summary["rejected"]["not_msgpack"] == 1
    # latency: every result with a creation time, each about 20 ms old
    assert total(samples, "lineguard_latency_seconds_count") == 6  # the two lost ones have none
    assert 0.02 <= total(samples, "lineguard_latency_seconds_sum") / 6 < 30
    assert total(samples, "lineguard_stage_info", role="sink") == 1


def test_a_run_serves_every_stage_while_it_runs(fitted_model):
    base = free_ports(6)
    config = RunConfig(model=fitted_model, frames=400, batch=4, workers=2, metrics_port=base)
    seen: dict[str, dict] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for name, port in (("sink", base + 1), ("producer", base + 2), ("post0", base + 3), ("infer0", base + 4),
                               ("infer1", base + 5)):
                try:
                    seen[name] = scrape(port)
                except OSError:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        summary = run_pipeline(config)
    finally:
        done.set()
        thread.join()
    assert set(seen) == {"sink", "producer", "post0", "infer0", "infer1"}, "every stage served its metrics during the run"
    released = total(seen["sink"], "lineguard_results_total")
    assert 0 < released <= summary["results"] == 400
    assert total(seen["sink"], "lineguard_results_total", verdict="defect") <= summary["defect"]
    assert 0 < total(seen["producer"], "lineguard_frames_sent_total", stream="cam0") <= 400
    for worker in ("infer0", "infer1"):
        scored = total(seen[worker], "lineguard_frames_scored_total")
        assert 0 < scored <= 400 and total(seen[worker], "lineguard_batch_size_count") > 0
        assert total(seen[worker], "lineguard_batch_size_sum") == scored  # every scored frame in one batch
        assert total(seen[worker], "lineguard_stage_info", role="worker", kind="memory_bank") == 1
    assert sum(total(seen[w], "lineguard_frames_scored_total") for w in ("infer0", "infer1")) <= 400
    assert 0 < total(seen["post0"], "lineguard_frames_decided_total") <= 400


def test_bad_metrics_ports_are_config_errors(fitted_model):
    with pytest.raises(ConfigError, match="1..65535"):
        RunConfig(model=fitted_model, metrics_port=65534)
    with pytest.raises(ConfigError, match="not a TCP port"):
        Metrics("sink", "sink", 0)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            Metrics("sink", "sink", busy.getsockname()[1])


def test_stages_without_a_port_serve_nothing_and_count_nothing():
    sink = Sink()
    sink.handle(result(0))
    assert sink.summary()["results"] == 1 and not hasattr(sink.metrics, "registry")
    assert np.isfinite(sink.summary()["latency_ms"]["p50"])
