"""A short soak (bench/soak.py): two minutes of synthetic frames through `lineguard run` with an inference
worker killed every 40 seconds: nothing lost, nothing logged twice, every restart recorded."""

from __future__ import annotations

from bench.soak import soak


def test_two_minute_soak_with_killed_workers_loses_nothing():
    result = soak(minutes=2.0, kill_every=40.0)
    assert result["kills"], "no worker was killed: the soak was too short to test anything"
    assert result["frames_in"] == result["results"] == result["frames"]
    assert result["lost"] == 0 and result["errors"] == 0
    assert result["logged"] == result["logged_unique"] == result["frames"]  # every verdict once in the log
    assert len([r for r in result["restarts"] if r["stage"].startswith("infer")]) == len(result["kills"])
    assert {"sink", "post0", "produce", "infer"} <= set(result["memory"])  # RSS sampled for every stage
