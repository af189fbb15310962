"""The whole pipeline as a user runs it: `lineguard run` in its own process, over ipc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.runtimes import Deployment
from pipeline.run import auto_workers


def _lineguard(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of pid."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                parents[int(entry.name)] = (int(ppid), cmd)
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for child, (ppid, cmd) in parents.items():
            if ppid == p:
                found.append((child, cmd))
                frontier.append(child)
    return found


class Subscriber:
    """A SUB socket on the run's --pub endpoint, connected before the run starts (ZeroMQ reconnects)."""

    def __init__(self, endpoint: str):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.received = 0

    def wait_for(self, count: int, timeout: float, proc: subprocess.Popen) -> None:
        from pipeline import wire

        deadline = time.monotonic() + timeout
        while self.received < count:
            assert proc.poll() is None, f"run ended (exit {proc.returncode}) early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"only {self.received} of {count} results within {timeout} s"
            if self.sock.poll(200):
                assert isinstance(wire.decode(self.sock.recv_multipart(copy=False)), wire.Result)
                self.received += 1

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _gone(pids: list[int]) -> bool:
    """Whether none of these processes runs any more (reaped, or a zombie)."""
    return all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
               for pid in pids)


@contextlib.contextmanager
def _endless_run(fitted_model, tmp_path, *args: str, frames: int = 100000,
                 **popen) -> Iterator[tuple[subprocess.Popen, Subscriber]]:
    """`lineguard run` of `frames` synthetic frames (by default longer than any test waits), results on a
    PUB the test reads; when the block ends the subscriber is closed and a run still going killed."""
    pub = f"ipc://{tmp_path}/pub"
    sub = Subscriber(pub)
    proc = subprocess.Popen(_lineguard("run", str(fitted_model), "--source", "synthetic", "--frames", str(frames),
                                       "--pub", pub, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    try:
        yield proc, sub
    finally:
        sub.close()
        if proc.poll() is None:
            proc.kill()


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_synthetic_run_accounts_for_every_frame_and_finds_planted_defects(fitted_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(_lineguard("run", str(fitted_model), "--source", "synthetic", "--frames", "60", "--out",
                                     str(out), "--json", str(tmp_path / "summary.json"), "--batch-size", "4"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("frames_in", "results", "ok", "defect", "error", "dropped", "fps", "latency_ms"):
        assert key in summary
    assert summary["frames_in"] == summary["results"] == 60
    assert summary["ok"] + summary["defect"] + summary["error"] == 60 and summary["error"] == 0
    assert summary["dropped"] == 0 and summary["fps"] > 0 and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"]
    lines = _lines(out / "results.jsonl")
    assert [r["seq"] for r in lines] == list(range(60))
    planted = [r for r in lines if r.get("meta", {}).get("planted")]
    normal = [r for r in lines if not r.get("meta", {}).get("planted")]
    assert planted and normal
    assert sum(r["verdict"] == "defect" for r in planted) >= 0.8 * len(planted)
    assert sum(r["verdict"] == "ok" for r in normal) >= 0.6 * len(normal)
    for r in lines:
        if r["verdict"] == "defect":
            assert r["regions"] and (out / "overlays" / f"cam0-{r['seq']:08d}.jpg").is_file()
            assert (out / "maps" / f"cam0-{r['seq']:08d}.png").is_file()
    assert "results" in proc.stdout and "fps" in proc.stdout
    workers = auto_workers(Deployment(), 1)  # the run says what it chose, before it starts
    assert f"lineguard run: {workers} inference worker{'s' * (workers > 1)} of 1 thread (onnxruntime fp32" in proc.stderr

    # the same --out again, fewer frames: its maps and overlays are this run's defect frames, none older
    again = subprocess.run(_lineguard("run", str(fitted_model), "--source", "synthetic", "--frames", "12", "--out",
                                      str(out), "--batch-size", "4"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    defects = {f"cam0-{r['seq']:08d}" for r in _lines(out / "results.jsonl") if r["verdict"] == "defect"}
    assert len(_lines(out / "results.jsonl")) == 12 and defects
    assert {p.stem for p in (out / "maps").iterdir()} == defects == {p.stem for p in (out / "overlays").iterdir()}


def test_folder_source_names_each_file(fitted_model, synthetic_data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(_lineguard("run", str(fitted_model), "--source", str(synthetic_data / "test"), "--out",
                                     str(out)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = _lines(out / "results.jsonl")
    files = sorted(str(p.relative_to(synthetic_data / "test")) for p in (synthetic_data / "test").rglob("*.png"))
    assert sorted(r["meta"]["file"] for r in lines) == files
    verdicts = {r["meta"]["file"]: r["verdict"] for r in lines}
    defective = [f for f in files if not f.startswith("good/")]
    assert sum(verdicts[f] == "defect" for f in defective) >= 0.8 * len(defective)


def test_twelve_bit_frames_in_16_bit_files_are_scaled_by_their_depth(synthetic_data, tmp_path):
    """A camera's 12-bit frames saved as 16-bit PNG files (0 to 4095): fit reads their depth (12 bits),
    so the model sees the frames' full range rather than their top 4 bits; eval reads them so, and
    `run` (its producer sends the 16-bit pixels, the worker scales them) scores each file as eval does."""
    import cv2
    import numpy as np

    from calibration.dataset import evaluation_samples, read_frame
    from calibration.evaluate import evaluate
    from calibration.maps import normalise
    from calibration.model import Inspector, Model
    from pipeline.cli import main

    data = tmp_path / "product"
    shutil.copytree(synthetic_data, data)
    for path in [*(data / "train").rglob("*.png"), *(data / "test").rglob("*.png")]:
        eight = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(path), eight.astype(np.uint16) << 4)  # 8-bit pixels as 12-bit samples
    model = tmp_path / "model"
    assert main(["fit", str(data), "-o", str(model), "--input-size", "64", "--coreset-ratio", "0.5"]) == 0
    fitted = Model(model)
    assert fitted.geometry.bits == 12
    sample = next((data / "test" / "good").iterdir())
    original = cv2.cvtColor(cv2.imread(str(synthetic_data / "test" / "good" / sample.name)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_frame(sample, fitted.geometer)[1], original)  # not 16 grey levels
    scored = evaluate(fitted, data)
    assert scored["image_auroc"] >= 0.9
    out = tmp_path / "out"
    proc = subprocess.run(_lineguard("run", str(model), "--source", str(data / "test"), "--out", str(out)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_scores = {r["meta"]["file"]: r["score"] for r in _lines(out / "results.jsonl")}
    with Inspector(fitted, Deployment(), batch=8) as inspector:
        for s in evaluation_samples(data):
            layout, pixels = read_frame(s.path, fitted.geometer)
            (want,) = inspector.inspect([pixels], [layout])
            assert run_scores[s.rel] == pytest.approx(float(normalise(want.score, fitted.thresholds["image"])),
                                                      abs=1e-4)


@pytest.mark.parametrize("stage", ["worker", "postprocess", "sink"])
def test_any_stage_killed_mid_run_loses_nothing(fitted_model, tmp_path, stage):
    """kill -9 of an inference worker, a postprocess worker or the sink: it is restarted, the producer
    sends again what has no verdict, the restarted sink resumes its log; every frame ends exactly once."""
    out = tmp_path / "out"
    with _endless_run(fitted_model, tmp_path, "--out", str(out), "--json", str(tmp_path / "summary.json"),
                      "--drain-timeout", "5", "--retry-after", "2", "--batch-size", "4", frames=300) as (proc, sub):
        sub.wait_for(40, 120, proc)
        victims = [pid for pid, cmd in _children(proc.pid) if f"pipeline.cli {stage} " in cmd]
        assert len(victims) == (auto_workers(Deployment(), 1) if stage == "worker" else 1)  # the default count
        if stage == "sink":  # the log holds every result released so far, written through
            released = len(_lines(out / "results.jsonl"))
        os.kill(victims[0], signal.SIGKILL)
        if stage == "sink":
            assert len(_lines(out / "results.jsonl")) >= released >= 40
        proc.wait(timeout=180)
    assert proc.returncode == 0, proc.stderr.read()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames_in"] == summary["results"] == 300
    assert summary["lost"] == 0 and summary["error"] == 0
    assert [r["stage"].rstrip("0123456789") for r in summary["restarts"]] == [
        {"worker": "infer", "postprocess": "post", "sink": "sink"}[stage]]
    lines = _lines(out / "results.jsonl")
    seqs = Counter(r["seq"] for r in lines)
    assert sorted(seqs) == list(range(300)) and max(seqs.values()) == 1  # every frame exactly once
    if stage == "sink":
        assert summary["resumed_from_log"] >= 40
    assert _children(proc.pid) == []


@pytest.mark.parametrize("change", ["refit", "damage"])
def test_a_worker_that_cannot_come_back_ends_the_run_saying_why(fitted_model, tmp_path, change):
    """A worker dies mid-run and its model is no longer the one the line started with (refitted into the
    same folder: the restart would decide by another model than the rest), or can no longer load (a
    damaged file: it would die at every restart): the run ends with one line saying why, instead of
    mixing two models' verdicts or restarting forever."""
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    with _endless_run(model, tmp_path) as (proc, sub):
        sub.wait_for(5, 120, proc)
        if change == "refit":
            manifest = json.loads((model / "manifest.json").read_text())
            manifest["fit"]["seed"] = 1  # another fit's manifest
            (model / "manifest.json").write_text(json.dumps(manifest))
        else:
            with open(model / "bank.faiss", "r+b") as f:
                f.seek(100)
                f.write(b"\0" * 16)
        worker = next(pid for pid, cmd in _children(proc.pid) if "pipeline.cli worker " in cmd)
        os.kill(worker, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2
    if change == "refit":
        assert "changed on disk during the run" in stderr
    else:
        assert "3 times in a row before it was ready" in stderr and "altered" in stderr


def test_sigterm_stops_every_process(fitted_model, tmp_path):
    with _endless_run(fitted_model, tmp_path) as (proc, sub):
        sub.wait_for(5, 120, proc)
        children = [pid for pid, _ in _children(proc.pid)]
        assert len(children) >= 4  # sink, postprocess, worker, producer
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 130 and _gone(children)


def test_ctrl_c_ends_the_streams_and_finishes_every_frame_sent(fitted_model, tmp_path):
    """A run without an end (a camera) ends by Ctrl-C: no new frames, but every frame already sent is
    scored and logged, the summary says so and the command exits 0 (a live source's end:
    tests/test_producers.py)."""
    out = tmp_path / "out"
    with _endless_run(fitted_model, tmp_path, "--out", str(out),
                      "--json", str(tmp_path / "summary.json")) as (proc, sub):
        sub.wait_for(20, 120, proc)
        children = [pid for pid, _ in _children(proc.pid)]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "ending: no new frames" in stderr and "ended on request (Ctrl-C)" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ended_on_request"] and summary["lost"] == 0 and summary["error"] == 0
    assert 20 <= summary["frames_in"] == summary["results"] < 100000
    seqs = Counter(r["seq"] for r in _lines(out / "results.jsonl"))
    assert sorted(seqs) == list(range(summary["results"])) and max(seqs.values()) == 1
    assert _gone(children)


def test_ctrl_c_as_the_producer_starts_still_ends_the_run_cleanly(fitted_model, tmp_path):
    """Ctrl-C the moment the producer process exists, before its Python has set its handler: the ending
    waits for it (stages start with SIGINT blocked) instead of killing it and failing the run."""
    with _endless_run(fitted_model, tmp_path, "--json", str(tmp_path / "summary.json")) as (proc, sub):
        deadline = time.monotonic() + 120
        while not any("pipeline.cli produce " in cmd for _, cmd in _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no producer started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ended_on_request"] and summary["frames_in"] == summary["results"] and summary["lost"] == 0


def test_a_run_under_nohup_goes_on_after_a_hangup(fitted_model, tmp_path):
    """`nohup lineguard run ... &`: SIGHUP ignored when the run starts stays ignored (a closed terminal
    or an ssh logout does not stop the line); Ctrl-C still ends it."""
    with _endless_run(fitted_model, tmp_path,
                      preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as (proc, sub):
        sub.wait_for(5, 120, proc)
        proc.send_signal(signal.SIGHUP)
        sub.wait_for(sub.received + 10, 60, proc)  # still scoring
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ended on request (Ctrl-C)" in stdout, stderr


def test_a_second_ctrl_c_stops_at_once(fitted_model, tmp_path):
    """The postprocess worker is paused, so the frames in flight cannot finish: the first Ctrl-C waits for
    them, the second stops every process."""
    with _endless_run(fitted_model, tmp_path) as (proc, sub):
        sub.wait_for(5, 120, proc)
        children = [pid for pid, _ in _children(proc.pid)]
        post = next(pid for pid, cmd in _children(proc.pid) if "pipeline.cli postprocess " in cmd)
        os.kill(post, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None  # still finishing what was sent
        proc.send_signal(signal.SIGINT)
        os.kill(post, signal.SIGCONT)
        stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "lineguard: interrupted" in stderr and _gone(children)


def test_the_stages_end_with_a_supervisor_killed_outright(fitted_model, tmp_path):
    """kill -9 of `lineguard run` itself (or the OOM killer): its stages get SIGTERM from Linux and end,
    so none is left holding a camera, a port or a GPU. The postprocess worker is held up first, so the
    inference workers are waiting to send into full queues when the signal comes."""
    with _endless_run(fitted_model, tmp_path) as (proc, sub):
        sub.wait_for(5, 120, proc)
        children = [pid for pid, _ in _children(proc.pid)]
        assert len(children) >= 4
        try:
            post = next(pid for pid, cmd in _children(proc.pid) if "pipeline.cli postprocess " in cmd)
            os.kill(post, signal.SIGSTOP)
            time.sleep(2.0)
            proc.kill()
            proc.wait(timeout=10)
            os.kill(post, signal.SIGCONT)  # a stopped process takes its SIGTERM when it runs again
            deadline = time.monotonic() + 20
            while not _gone(children) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            left = [(pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:5]) for pid in children
                    if not _gone([pid])]
            for pid, _ in left:  # reparented away from the test by now: ended by pid
                os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} stages outlived their supervisor: {left}"


@pytest.mark.parametrize("case", ["missing_model", "bad_source", "engine_not_exported"])
def test_run_errors_are_one_line(fitted_model, tmp_path, case, capsys):
    """Before any stage starts (no "exited while starting" from a stage), one line naming the problem."""
    from pipeline.cli import main

    if case == "missing_model":
        code = main(["run", str(tmp_path / "nope"), "--frames", "5"])
        expected = "nope"
    elif case == "engine_not_exported":
        model = tmp_path / "model"
        shutil.copytree(fitted_model, model, ignore=shutil.ignore_patterns("engines"))
        code = main(["run", str(model), "--frames", "5", "--precision", "int8"])
        expected = f"build it first with: lineguard export {model} --runtime onnxruntime --precision int8"
    else:
        code = main(["run", str(fitted_model), "--source", str(tmp_path / "missing.mp4"), "--frames", "5"])
        expected = "missing.mp4"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "while starting" not in err[0]
