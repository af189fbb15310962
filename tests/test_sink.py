"""The sink: per-stream ordering and accounting (Ledger), outputs (Sink), and run_sink over ZeroMQ."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from pipeline import wire
from pipeline.sinks import Ledger, Sink, run_sink
from plumbing import Background, Net

TIMEOUT_S = 10.0  # the most any step may take before the test fails instead of hanging


# ---- test-side plumbing ----


def start_sink(net: Net, stop: threading.Event, **kwargs) -> tuple[Background, zmq.Socket, zmq.Socket]:
    """run_sink in a thread; once it said 'ready': (it, a PUSH connected to its results, its control PULL)."""
    control = net.socket(zmq.PULL, bind=net.endpoint("control"))
    run = Background(run_sink, net.endpoint("results"), control=net.endpoint("control"), stop=stop, **kwargs)
    try:
        assert control.poll(int(TIMEOUT_S * 1000)), "run_sink sent no 'ready'"
        ready = wire.decode(control.recv_multipart())
        assert isinstance(ready, wire.Control) and (ready.event, ready.role) == ("ready", "sink")
    except BaseException:
        stop_sink(run, stop)
        raise
    return run, net.socket(zmq.PUSH, connect=net.endpoint("results")), control


def stop_sink(run: Background, stop: threading.Event) -> None:
    stop.set()
    run.thread.join(TIMEOUT_S)
    assert not run.thread.is_alive(), "run_sink did not end on stop"


def res(seq: int, verdict: str = "ok", stream: str = "cam0", **fields) -> wire.Result:
    fields.setdefault("t_ns", time.time_ns())
    if verdict == "error":
        fields.setdefault("error", "rejected: test")
    return wire.Result(stream, seq, verdict=verdict, **fields)


def seqs(released) -> list[int]:
    return [r.seq for r, _ in released]


# ---- Ledger ----

def test_ledger_releases_in_order_results_at_once():
    ledger = Ledger("cam0", window=4)
    for seq in range(3):
        r = res(seq)
        assert ledger.accept(r) == [(r, False)]
    assert ledger.next_seq == 3 and not ledger.pending and ledger.gaps == 0


def test_ledger_holds_out_of_order_results_until_the_gap_fills():
    ledger = Ledger("cam0", window=4)
    assert ledger.accept(res(2)) == []
    assert ledger.accept(res(1)) == []
    released = ledger.accept(res(0))
    assert seqs(released) == [0, 1, 2] and not any(late for _, late in released)
    assert not ledger.pending and ledger.next_seq == 3 and ledger.gaps == 0


def test_ledger_counts_duplicates_and_releases_them_once():
    ledger = Ledger("cam0", window=4)
    released = ledger.accept(res(0))
    assert ledger.accept(res(0)) == []  # already released
    released += ledger.accept(res(2))
    assert ledger.accept(res(2)) == []  # still waiting
    released += ledger.accept(res(1))
    assert ledger.accept(res(2)) == []  # released since
    assert seqs(released) == [0, 1, 2] and ledger.duplicates == 3


def test_ledger_skips_a_gap_after_window_results_wait_and_releases_it_late_once():
    ledger = Ledger("cam0", window=3)
    released = []
    for seq in (1, 2, 3):  # `window` results may wait behind the gap
        released += ledger.accept(res(seq))
    assert released == [] and ledger.skipped == set()
    released += ledger.accept(res(4))  # one more: the gap is skipped
    assert seqs(released) == [1, 2, 3, 4] and not any(late for _, late in released)
    assert ledger.skipped == {0} and ledger.gaps == 1 and not ledger.complete
    late = ledger.accept(res(0))
    assert seqs(late) == [0] and late[0][1] is True and ledger.late == 1
    assert ledger.accept(res(0)) == [] and ledger.duplicates == 1  # released once only
    ledger.expected = 5
    assert ledger.complete and ledger.missing() == []
    assert Counter(seqs(released + late)) == Counter(range(5))


def test_ledger_acknowledges_only_what_it_has_released():
    """A result waiting behind a gap lives only in the sink's memory: acknowledged, the producer would
    forget it and a killed sink would lose it (the kill test lost 8 frames this way)."""
    ledger = Ledger("cam0", window=4)
    for seq in (0, 1, 3, 4):
        ledger.accept(res(seq))
    ack = wire.decode(ledger.ack())
    assert [s for s in range(6) if ack.covers(s)] == [0, 1] and not ack.done
    ledger.accept(res(2))
    ack = wire.decode(ledger.ack())
    assert [s for s in range(6) if ack.covers(s)] == [0, 1, 2, 3, 4]
    skipping = Ledger("cam1", window=1)
    for seq in range(1, 2 * wire.MAX_ACK_MISSING + 4, 2):  # every even seq skipped, more than an ack can list
        skipping.accept(res(seq, stream="cam1"))
    ack = wire.decode(skipping.ack())
    released = {s for s in range(skipping.next_seq) if s not in skipping.skipped}
    covered = {s for s in range(skipping.next_seq + 1) if ack.covers(s)}
    assert covered and covered <= released and len(ack.missing) == wire.MAX_ACK_MISSING


def test_ledger_is_complete_once_the_eos_count_is_reached():
    ledger = Ledger("cam0", window=8)
    ledger.accept(res(0))
    ledger.accept(res(1))
    assert not ledger.complete  # no eos yet
    ledger.expected = 3
    assert not ledger.complete and ledger.missing() == [2]
    ledger.accept(res(2))
    assert ledger.complete
    empty = Ledger("cam1", window=8)
    empty.expected = 0
    assert empty.complete  # a stream of no frames


def test_ledger_missing_and_flush_account_for_every_seq_once():
    ledger = Ledger("cam0", window=2)
    released = []
    for seq in (0, 2, 3, 4, 6):  # 1 skipped (more than 2 waited), 5 and 7 never come
        released += ledger.accept(res(seq))
    assert seqs(released) == [0, 2, 3, 4]
    ledger.expected = 8
    assert ledger.missing() == [1, 5, 7] and not ledger.complete
    flushed = ledger.flush("lost: test drain")
    assert seqs(flushed) == [1, 5, 6, 7]
    for result, late in flushed:
        if result.seq == 6:
            assert result.verdict == "ok" and not late  # the waiting result, as it came
        else:
            assert result.verdict == "error" and result.error.startswith("lost")
            assert (result.stream, result.t_ns) == ("cam0", 0)
            assert late is (result.seq == 1)  # 1 was skipped before: it comes after later seqs
    assert ledger.lost_seqs == [1, 5, 7] and ledger.complete
    released += flushed
    for seq in (1, 5, 7):  # a result that turns up after its seq was declared lost is not released again
        released += ledger.accept(res(seq))
    assert ledger.duplicates == 3
    assert ledger.flush("lost: again") == []
    assert Counter(seqs(released)) == Counter(range(8))


def test_ledger_flush_without_any_result():
    ledger = Ledger("cam0", window=4)
    ledger.expected = 3
    flushed = ledger.flush("lost: nothing came")
    assert seqs(flushed) == [0, 1, 2] and all(r.error == "lost: nothing came" and not late for r, late in flushed)


# ---- Sink ----

def test_sink_writes_every_defect_map_released_together(tmp_path):
    """Results released in one go (a gap filled) each keep their defect map."""
    sink = Sink(jsonl=tmp_path / "results.jsonl", maps_dir=tmp_path / "maps")
    defect_map = np.full((4, 4), 200, np.uint8)
    for seq in (2, 1):
        sink.handle(wire.encode_result(res(seq, "defect", score=0.9, defect_map=defect_map)))
    sink.handle(wire.encode_result(res(0, score=0.1)))  # releases 0, 1 and 2 at once
    sink.close()
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["cam0-00000001.png", "cam0-00000002.png"]


def test_sink_logs_a_defect_map_it_cannot_write_and_keeps_the_result(tmp_path, caplog):
    """Its maps folder cannot be made (a file of that name is in the way): the result is logged all the same."""
    (tmp_path / "maps").write_text("in the way")
    sink = Sink(jsonl=tmp_path / "results.jsonl", maps_dir=tmp_path / "maps")
    with caplog.at_level("ERROR", logger="lineguard.sink"):
        sink.handle(wire.encode_result(res(0, "defect", score=0.9, defect_map=np.full((4, 4), 9, np.uint8))))
        sink.handle(wire.encode_result(res(1, score=0.1)))
    sink.close()
    assert [json.loads(line)["seq"] for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [0, 1]
    assert "could not write the defect map" in caplog.text and "permissions" in caplog.text


def test_sink_counts_orders_and_writes_results(tmp_path):
    jsonl, maps = tmp_path / "results.jsonl", tmp_path / "maps"
    sink = Sink(jsonl=jsonl, maps_dir=maps)
    t0 = time.time_ns() - 50_000_000  # every frame 50 ms old
    defect_map = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8) * 5
    region = wire.Region((1, 2, 3, 4), 10, 0.9)
    messages = [
        res(2, "defect", t_ns=t0, score=0.9, regions=(region,), timing={"infer": 2.0, "batch": 4.0},
            defect_map=defect_map, meta={"file": "x.png"}),
        res(0, t_ns=t0, score=0.1, timing={"infer": 4.0, "batch": 2.0}),
        res(1, "error", t_ns=t0, error="rejected: bad payload"),
        res(0, stream="cam1", t_ns=t0, score=0.2),
    ]
    for result in messages:
        sink.handle(wire.encode_result(result))
    sink.handle(wire.encode_eos("cam0", 3))
    sink.handle(wire.encode_eos("cam1", 1, dropped=2))
    sink.handle([b"\xc1 not msgpack"])
    sink.handle(wire.encode_frame("cam0", 9, np.zeros((2, 2, 3), np.uint8)))  # a frame has no business here
    sink.handle([msgpack.packb({"v": 1, "kind": "result", "stream": "cam0", "seq": 3, "t_ns": 1, "verdict": "meh"})])
    assert sink.complete(2) and not sink.complete(3)
    summary = sink.summary()
    sink.close()

    assert (summary["results"], summary["ok"], summary["defect"], summary["error"]) == (4, 2, 1, 1)
    assert (summary["frames_in"], summary["lost"], summary["dropped"]) == (4, 0, 2)
    assert summary["rejected"] == {"not_msgpack": 1, "bad_kind": 1, "bad_field": 1}
    assert summary["fps"] > 0
    assert 50 <= summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"] < 60_000
    assert summary["stage_ms"]["infer"]["mean"] == pytest.approx(3.0) and "batch" not in summary["stage_ms"]
    assert summary["mean_batch"] == pytest.approx(3.0)
    assert summary["streams"]["cam0"]["expected"] == 3 and summary["streams"]["cam1"]["expected"] == 1

    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["stream"], r["seq"]) for r in lines if r["stream"] == "cam0"] == [("cam0", 0), ("cam0", 1), ("cam0", 2)]
    assert [(r["stream"], r["seq"]) for r in lines if r["stream"] == "cam1"] == [("cam1", 0)]
    keys = {"stream", "seq", "verdict", "score", "regions", "timing", "error", "t_ns"}
    by_seq = {(r["stream"], r["seq"]): r for r in lines}
    for record in lines:
        assert set(record) == (keys | {"meta"} if record is by_seq["cam0", 2] else keys)
    assert by_seq["cam0", 2] == {"stream": "cam0", "seq": 2, "verdict": "defect", "score": 0.9,
                                 "regions": [{"bbox": [1, 2, 3, 4], "area": 10, "score": 0.9}],
                                 "timing": {"infer": 2.0, "batch": 4.0}, "error": None, "t_ns": t0,
                                 "meta": {"file": "x.png"}}
    assert by_seq["cam0", 1]["verdict"] == "error" and by_seq["cam0", 1]["error"] == "rejected: bad payload"

    assert sorted(p.name for p in maps.iterdir()) == ["cam0-00000002.png"]  # only results with a map
    np.testing.assert_array_equal(cv2.imread(str(maps / "cam0-00000002.png"), cv2.IMREAD_UNCHANGED), defect_map)


def test_sink_drain_declares_the_missing_seqs_of_ended_streams_lost(tmp_path):
    sink = Sink(jsonl=tmp_path / "r.jsonl")
    for seq in (0, 2):
        sink.handle(wire.encode_result(res(seq)))
    sink.handle(wire.encode_result(res(1, stream="open")))  # a stream that has not ended
    sink.handle(wire.encode_eos("cam0", 4))
    assert not sink.complete(1)
    sink.drain("test")
    assert sink.streams["cam0"].complete and not sink.streams["open"].complete  # "open" still waits for its eos
    summary = sink.summary()
    sink.close()
    assert (summary["lost"], summary["error"], summary["ok"]) == (2, 2, 2)
    assert summary["streams"]["cam0"]["lost"] == [1, 3] and summary["streams"]["open"]["lost"] == []
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["seq"]) for r in lines] == [("cam0", 0), ("cam0", 1), ("cam0", 2), ("cam0", 3)]
    assert all(r["error"].startswith("lost") and r["verdict"] == "error" for r in lines if r["seq"] in (1, 3))


def test_sink_summary_before_any_result():
    summary = Sink().summary()
    assert (summary["results"], summary["ok"], summary["defect"], summary["error"]) == (0, 0, 0, 0)
    assert (summary["frames_in"], summary["lost"], summary["dropped"], summary["fps"]) == (0, 0, 0, 0.0)
    assert set(summary["latency_ms"]) == {"p50", "p99"} and summary["streams"] == {}


def test_sink_complete_counts_ended_streams_not_eos_messages():
    sink = Sink()
    sink.handle(wire.encode_result(res(0)))
    sink.handle(wire.encode_eos("cam0", 1))
    sink.handle(wire.encode_eos("cam0", 1))
    assert not sink.complete(2)


def test_a_resumed_sink_knows_which_streams_had_ended(tmp_path):
    """Stream a ended (its producer, acknowledged done, sends its eos no more), b had not, when the sink
    was killed: the restarted sink still counts a as ended, so the run can finish; its per-stream counts
    are the log's. A sink that does not resume starts with no stream ended."""
    jsonl = tmp_path / "results.jsonl"
    sink = Sink(jsonl=jsonl)
    sink.handle(wire.encode_result(res(0, stream="a")))
    sink.handle(wire.encode_result(res(1, "defect", stream="a", score=0.9)))
    sink.handle(wire.encode_eos("a", 2, 3))
    sink.handle(wire.encode_result(res(0, stream="b")))
    assert sink.streams["a"].complete  # an ack now says a is done
    del sink  # killed: nothing closed
    again = Sink(jsonl=jsonl, resume=True)
    assert again.ended == 1 and again.streams["a"].complete and again.streams["a"].dropped == 3
    again.handle(wire.encode_result(res(1, stream="b")))
    again.handle(wire.encode_eos("b", 2))
    assert again.complete(2)
    summary = again.summary()
    assert summary["frames_in"] == summary["results"] == 4 and summary["dropped"] == 3
    assert summary["streams"]["a"]["defect"] == 1 and summary["streams"]["b"]["ok"] == 2
    again.close()
    assert Sink(jsonl=jsonl).ended == 0


def test_sink_logs_meta_json_has_no_type_for_and_keeps_stream_files_in_their_folder(tmp_path):
    """A frame's meta may hold bytes (msgpack has them): logged as hex, not a crash that restarts the sink.
    A stream named like a path ("../x") gets its defect maps inside the maps folder, one file each."""
    jsonl, maps = tmp_path / "log" / "results.jsonl", tmp_path / "log" / "maps"
    jsonl.parent.mkdir()
    sink = Sink(jsonl=jsonl, maps_dir=maps)
    sink.handle(wire.encode_result(res(0, meta={"raw": b"\x00\xff", "id": 7})))
    for stream in ("../x", "..%2Fx"):
        sink.handle(wire.encode_result(res(0, "defect", stream=stream, score=0.9,
                                           defect_map=np.full((4, 4), 200, np.uint8))))
    sink.close()
    assert json.loads(jsonl.read_text().splitlines()[0])["meta"] == {"raw": "00ff", "id": 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]
    assert sorted(p.name for p in maps.iterdir()) == ["..%252Fx-00000000.png", "..%2Fx-00000000.png"]


def test_ledger_gives_up_the_oldest_skipped_seqs_beyond_what_an_ack_lists():
    """A line that runs for months loses a frame now and then: past wire.MAX_ACK_MISSING skipped seqs,
    the oldest is declared lost, so the acknowledgement goes on covering every seq logged."""
    ledger = Ledger("cam0", window=1)
    released = []
    for seq in range(1, 2 * (wire.MAX_ACK_MISSING + 2), 2):  # every even seq missing
        released += ledger.accept(res(seq))
    assert len(ledger.skipped) == wire.MAX_ACK_MISSING
    lost = [r.seq for r, late in released if r.verdict == "error"]
    assert lost and lost == list(range(0, 2 * len(lost), 2))  # the oldest gaps, in order
    assert all(r.error.startswith("lost") for r, _ in released if r.seq in lost)
    assert ledger.lost_seqs == lost
    ack = wire.decode(ledger.ack())
    assert ack.next == ledger.next_seq and len(ack.missing) == wire.MAX_ACK_MISSING
    assert ledger.accept(res(0)) == []  # the result of a frame declared lost comes too late: a duplicate


def test_a_resumed_log_with_more_gaps_than_an_ack_lists_gives_up_the_oldest(tmp_path):
    jsonl = tmp_path / "results.jsonl"
    jsonl.write_text("".join(json.dumps({"stream": "cam0", "seq": seq, "verdict": "ok"}) + "\n"
                             for seq in range(1, 2 * (wire.MAX_ACK_MISSING + 3), 2)))
    sink = Sink(jsonl=jsonl, resume=True)
    ledger = sink.streams["cam0"]
    assert len(ledger.skipped) == wire.MAX_ACK_MISSING and ledger.lost_seqs == [0, 2, 4]  # M + 3 gaps
    assert wire.decode(ledger.ack()).next == ledger.next_seq  # an ack it can send
    sink.close()
    lost = [json.loads(line) for line in jsonl.read_text().splitlines()][-3:]
    assert [(r["seq"], r["verdict"], r["late"]) for r in lost] == [(s, "error", True) for s in (0, 2, 4)]


def test_results_beyond_a_streams_end_are_counted_not_declared_lost(tmp_path):
    """A stray seq past the count a stream's eos gave (a foreign producer numbering by its own rule) is
    no frame of that stream: counted, and no fabricated lost results for the seqs in between."""
    sink = Sink()
    sink.handle(wire.encode_eos("cam0", 3))
    for seq in (0, 1, 2, 50):
        sink.handle(wire.encode_result(res(seq)))
    assert sink.complete(1)
    sink.drain("test")
    summary = sink.summary()
    assert summary["results"] == 3 and summary["lost"] == 0 and summary["beyond_end"] == 1


# ---- run_sink ----

def test_run_sink_returns_the_summary_once_every_result_is_in(net, tmp_path):
    stop = threading.Event()
    run, push, _ = start_sink(net, stop, jsonl=tmp_path / "r.jsonl", streams=1, drain_timeout=TIMEOUT_S)
    try:
        push.send_multipart(wire.encode_eos("cam0", 5))  # eos may overtake results
        for seq in (4, 3, 0, 1, 2):
            push.send_multipart(wire.encode_result(res(seq)))
        summary = run.finish(TIMEOUT_S / 2)  # sooner than drain_timeout: it ended because it was complete
    finally:
        stop_sink(run, stop)
    assert (summary["results"], summary["ok"], summary["lost"], summary["frames_in"]) == (5, 5, 0, 5)
    assert summary["streams"]["cam0"]["expected"] == 5 and summary["streams"]["cam0"]["lost"] == []
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == [0, 1, 2, 3, 4]


def test_run_sink_declares_a_result_lost_after_the_drain_timeout(net, tmp_path):
    stop = threading.Event()
    run, push, _ = start_sink(net, stop, jsonl=tmp_path / "r.jsonl", streams=1, drain_timeout=0.3)
    try:
        for seq in range(10):
            if seq != 5:
                push.send_multipart(wire.encode_result(res(seq)))
        push.send_multipart(wire.encode_eos("cam0", 10))
        t_eos = time.monotonic()
        summary = run.finish()
        assert time.monotonic() - t_eos >= 0.3  # it waited drain_timeout after the last message
    finally:
        stop_sink(run, stop)
    assert (summary["results"], summary["ok"], summary["error"], summary["lost"]) == (10, 9, 1, 1)
    assert summary["streams"]["cam0"]["lost"] == [5]
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(10))
    assert lines[5]["verdict"] == "error" and lines[5]["error"].startswith("lost")


def test_run_sink_with_streams_zero_runs_until_stopped(net):
    stop = threading.Event()
    run, push, control = start_sink(net, stop, streams=0)
    try:
        push.send_multipart(wire.encode_result(res(0)))
        push.send_multipart(wire.encode_eos("cam0", 1))
        status = None
        while status is None or status.data["results"] < 1:  # its status reports (every 0.5 s) show the result
            assert control.poll(int(TIMEOUT_S * 1000)), "no status from run_sink"
            message = wire.decode(control.recv_multipart())
            status = message if message.event == "status" else status
        assert run.thread.is_alive()  # stream cam0 is complete, but streams=0 waits for stop
        stop.set()
        summary = run.finish()
    finally:
        stop_sink(run, stop)
    assert (summary["results"], summary["frames_in"]) == (1, 1)


def test_run_sink_publishes_results_to_subscribers(net):
    stop = threading.Event()
    pub_ep = net.endpoint("pub")
    run, push, _ = start_sink(net, stop, pub_endpoint=pub_ep, streams=1, drain_timeout=TIMEOUT_S)
    try:
        sub = net.socket(zmq.SUB, connect=pub_ep)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        # PUB drops what it sends before the subscription arrives: probe until a result gets through
        sent: dict[int, wire.Result] = {}
        received: list[wire.Result] = []
        for seq in range(200):
            sent[seq] = res(seq, score=seq / 100)
            push.send_multipart(wire.encode_result(sent[seq]))
            if sub.poll(50):
                received.append(wire.decode(sub.recv_multipart()))
                break
        assert received, "the subscriber received nothing"
        n = len(sent) + 5
        for seq in range(len(sent), n):
            sent[seq] = res(seq, score=seq / 100)
            push.send_multipart(wire.encode_result(sent[seq]))
        push.send_multipart(wire.encode_eos("cam0", n))
        summary = run.finish()
        while received[-1].seq < n - 1 and sub.poll(int(TIMEOUT_S * 1000)):
            received.append(wire.decode(sub.recv_multipart()))
    finally:
        stop_sink(run, stop)
    assert summary["results"] == n
    first = received[0].seq
    assert [r.seq for r in received] == list(range(first, n))  # nothing lost once subscribed, in order
    for r in received:
        assert isinstance(r, wire.Result) and r == sent[r.seq]


def test_sink_memory_is_bounded_and_its_percentiles_hold():
    """Latency and stage timings are kept in bounded reservoirs (a line runs for months); their
    percentiles and means still match the exact ones."""
    from pipeline.sinks import Reservoir

    rng = np.random.default_rng(5)
    values = rng.lognormal(3.0, 0.5, 200_000)
    reservoir = Reservoir(size=20_000, seed=1)
    for v in values:
        reservoir.add(float(v))
    assert reservoir.count == len(values) and len(reservoir.values) == 20_000
    assert reservoir.mean == pytest.approx(values.mean())
    for q in (50, 99):
        assert reservoir.percentile(q) == pytest.approx(np.percentile(values, q), rel=0.03)
    assert Reservoir().percentile(50) == 0.0 and Reservoir().mean == 0.0
