"""The live web view in a real browser (headless Chromium + Selenium): it updates itself and its
counts match the sink's; its JSON and image endpoints without a browser."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import zmq

from bench.view import chromium, free_port, latest_image, listening, missing, page_counts, wait_for
from pipeline import wire
from pipeline.sinks import run_sink

BROWSER = missing()


def _results(seqs, verdicts) -> list[list]:
    out = []
    for seq, verdict in zip(seqs, verdicts):
        defect_map = np.full((32, 48), 200, np.uint8) if verdict == "defect" else None
        error = "rejected: broken" if verdict == "error" else None
        out.append(wire.encode_result(wire.Result("cam0", seq, time.time_ns(), verdict,
                                                  None if error else (0.9 if defect_map is not None else 0.1),
                                                  error=error, defect_map=defect_map)))
    return out


@pytest.fixture
def live_sink(tmp_path, fitted_model):
    """A standalone sink with the view, fed by the test over ipc; yields (send, port, stop-and-summary)."""
    port = free_port()
    endpoint = f"ipc://{tmp_path / 'results'}"
    summary = {}
    stop = threading.Event()
    thread = threading.Thread(target=lambda: summary.update(run_sink(endpoint, streams=0, models=fitted_model,
                                                                     view_port=port, overlays=tmp_path / "overlays",
                                                                     stop=stop)), daemon=True)
    thread.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    wait_for(lambda: listening(port), timeout=30)

    def finish() -> dict:
        stop.set()
        thread.join(timeout=30)
        return summary

    yield (lambda messages: [push.send_multipart(m) for m in messages]), port, finish
    stop.set()
    push.close(linger=0)
    ctx.term()


def test_state_and_images_without_a_browser(live_sink, tmp_path):
    send, port, finish = live_sink
    (tmp_path / "overlays").mkdir()
    written = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "overlays" / "cam0-00000004.jpg").write_bytes(written)  # as a postprocess worker writes it
    send(_results(range(6), ["ok", "defect", "ok", "error", "defect", "ok"]))
    base = f"http://127.0.0.1:{port}"
    state = wait_for(lambda: (s := json.loads(urllib.request.urlopen(f"{base}/state.json").read()))["streams"]
                     .get("cam0", {}).get("results") == 6 and s)
    cam = state["streams"]["cam0"]
    assert (cam["ok"], cam["defect"], cam["error"], cam["latest_defect"]) == (3, 2, 1, 4)
    assert [r["seq"] for r in cam["recent"]] == [5, 4, 3, 2, 1, 0]
    assert state["models"]["*"]["kind"] == "memory_bank" and state["models"]["*"]["normal_images"] > 0
    assert urllib.request.urlopen(f"{base}/latest/cam0.jpg").read() == written  # the overlay file, as it is
    send(_results([6], ["defect"]))  # no overlay file for this one: its defect map in colour
    wait_for(lambda: json.loads(urllib.request.urlopen(f"{base}/state.json").read())["streams"]["cam0"]
             ["latest_defect"] == 6)
    response = urllib.request.urlopen(f"{base}/latest/cam0.jpg")
    colour = cv2.imdecode(np.frombuffer(response.read(), np.uint8), cv2.IMREAD_COLOR)
    assert response.headers["Content-Type"] == "image/jpeg" and colour.shape == (32, 48, 3)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{base}/latest/nothing.jpg")
    assert "lineguard" in urllib.request.urlopen(base + "/").read().decode()
    summary = finish()
    assert (summary["ok"], summary["defect"], summary["error"]) == (3, 3, 1)


@pytest.mark.skipif(BROWSER is not None, reason=f"no browser to drive: {BROWSER}")
def test_the_page_updates_itself_and_matches_the_sink(live_sink):
    send, port, finish = live_sink
    verdicts = ["ok"] * 20 + ["defect"] * 8 + ["error"] * 2
    send(_results(range(30), verdicts))
    with chromium() as driver:
        driver.get(f"http://127.0.0.1:{port}/")
        first = wait_for(lambda: (c := page_counts(driver, "cam0")) and c["results"] == 30 and c)
        assert first == {"results": 30, "ok": 20, "defect": 8, "error": 2, "lost": 0}
        updated = driver.find_element("tag name", "body").get_attribute("data-updated")
        send(_results(range(30, 55), ["defect"] * 5 + ["ok"] * 20))  # the page must notice these by itself
        second = wait_for(lambda: (c := page_counts(driver, "cam0")) and c["results"] == 55 and c)
        assert driver.find_element("tag name", "body").get_attribute("data-updated") != updated
        assert wait_for(lambda: (src := latest_image(driver, "cam0")) and src.endswith(".jpg?seq=34"))
    summary = finish()
    assert second == {"results": summary["results"], "ok": summary["ok"], "defect": summary["defect"],
                      "error": summary["error"], "lost": summary["lost"]} == {"results": 55, "ok": 40, "defect": 13,
                                                                              "error": 2, "lost": 0}


@pytest.mark.skipif(BROWSER is not None, reason=f"no browser to drive: {BROWSER}")
def test_the_page_follows_a_running_line(fitted_model, tmp_path):
    """`lineguard run --view-port`: the page's counts rise while the line runs (a line without an end,
    so a slow browser start cannot miss it) and never run ahead of the sink's; Ctrl-C ends it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(fitted_model), "--source", "synthetic",
                             "--frames", "100000", "--out", str(tmp_path / "out"), "--view-port", str(port),
                             "--json", str(tmp_path / "summary.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with chromium() as driver:
            wait_for(lambda: listening(port), timeout=120)
            driver.get(f"http://127.0.0.1:{port}/")
            seen = [wait_for(lambda: (c := page_counts(driver, "cam0")) and c["results"] > 0 and c, timeout=120)]
            seen.append(wait_for(lambda: (c := page_counts(driver, "cam0")) and c["results"] > seen[0]["results"] and c,
                                 timeout=60))
            assert driver.find_elements("css selector", "#stream-cam0 .fps")
            driver.save_screenshot(str(tmp_path / "view.png"))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert (tmp_path / "view.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ended_on_request"] and summary["results"] == summary["frames_in"] > 0
    for counts in seen:  # what the page showed never ran ahead of the sink
        assert counts["results"] <= summary["results"] and counts["defect"] <= summary["defect"]
