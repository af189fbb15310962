"""The live web view, served by the sink (`--view-port`): per stream the latest defect with its map,
frames/s, defect rate, latency, drift, the recent verdicts, and the model with its thresholds.

    GET /             the page; it polls /state.json twice a second and updates itself
    GET /state.json   {"streams": {name: {...}}, "models": {name: {...}}, "t": unix seconds}
    GET /latest/S.jpg the latest defective frame of stream S: its overlay when the run writes
                      overlays, otherwise its defect map in colour

The sink feeds every released result to `View.observe` (its own thread); the HTTP server reads a
copy under a lock, so a slow browser never holds the line back.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from calibration.images import OVERLAY_JPEG, OVERLAY_SUFFIX, overlay_file
from engines.errors import ConfigError

RECENT = 20  # verdicts listed per stream
RATE_WINDOW_S = 5.0  # frames/s over the last seconds


class _Stream:
    def __init__(self):
        self.counts = {"ok": 0, "defect": 0, "error": 0, "lost": 0}
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.times: collections.deque = collections.deque(maxlen=4096)  # release times (monotonic)
        self.latency_ms: collections.deque = collections.deque(maxlen=500)
        self.latest: tuple[int, np.ndarray] | None = None  # (seq, defect map uint8 [H, W])


class View:
    """State of every stream for the page, and the HTTP server that shows it."""

    def __init__(self, port: int, models: dict[str, Path] | Path | None = None, overlays: Path | None = None):
        self.lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}
        self.drift: dict = {}
        self.overlays = Path(overlays) if overlays else None
        self.models = _model_info(models)
        view = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # http.server calls this name
                view._serve(self)

            def log_message(self, *args):  # quiet: the line's log is the sink's
                pass

        try:
            self.server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        except OSError as exc:
            raise ConfigError(f"--view-port {port}: cannot listen ({exc.strerror}); choose a free port") from exc
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="view", daemon=True)
        self.thread.start()

    def observe(self, result, late: bool) -> None:
        """One released result (wire.Result)."""
        now = time.monotonic()
        with self.lock:
            s = self.streams.setdefault(result.stream, _Stream())
            s.counts[result.verdict] += 1
            lost = bool(result.error and result.error.startswith("lost"))
            s.counts["lost"] += lost
            s.times.append(now)
            if result.t_ns:
                s.latency_ms.append((time.time_ns() - result.t_ns) / 1e6)
            s.recent.appendleft({"seq": result.seq, "verdict": result.verdict, "score": result.score,
                                 "regions": len(result.regions), "error": result.error, "late": late,
                                 "file": result.meta.get("file") if result.meta else None})
            if result.verdict == "defect" and result.defect_map is not None:
                s.latest = (result.seq, result.defect_map)

    def set_drift(self, drift: dict) -> None:
        with self.lock:
            self.drift = drift

    def state(self) -> dict:
        now = time.monotonic()
        out = {}
        with self.lock:
            for name, s in sorted(self.streams.items()):
                recent = [t for t in s.times if now - t <= RATE_WINDOW_S]
                span = (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
                results = s.counts["ok"] + s.counts["defect"] + s.counts["error"]
                lat = np.array(s.latency_ms) if s.latency_ms else None
                out[name] = {**s.counts, "results": results,
                             "fps": (len(recent) - 1) / span if span > 0 else 0.0,
                             "defect_rate": s.counts["defect"] / results if results else 0.0,
                             "latency_ms": None if lat is None else {"p50": float(np.percentile(lat, 50)),
                                                                      "p99": float(np.percentile(lat, 99))},
                             "latest_defect": None if s.latest is None else s.latest[0],
                             "recent": list(s.recent), "drift": self.drift.get(name)}
        return {"streams": out, "models": self.models, "t": time.time()}

    def latest_image(self, stream: str) -> bytes | None:
        """JPEG bytes of stream's latest defect: its overlay file, or its defect map in colour; None without one."""
        with self.lock:
            s = self.streams.get(stream)
            latest = None if s is None else s.latest
        if latest is None:
            return None
        seq, defect_map = latest
        overlay = self.overlays / overlay_file(stream, seq) if self.overlays else None
        if overlay is not None and overlay.is_file():
            return overlay.read_bytes()
        ok, jpeg = cv2.imencode(OVERLAY_SUFFIX, cv2.applyColorMap(defect_map, cv2.COLORMAP_JET), OVERLAY_JPEG)
        return jpeg.tobytes() if ok else None

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/":
            body, kind = PAGE.encode(), "text/html; charset=utf-8"
        elif path == "/state.json":
            body, kind = json.dumps(self.state()).encode(), "application/json"
        elif path.startswith("/latest/") and path.endswith(".jpg"):
            body, kind = self.latest_image(path[len("/latest/"):-len(".jpg")]), "image/jpeg"
        else:
            body, kind = None, ""
        if body is None:
            request.send_error(404)
            return
        request.send_response(200)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _model_info(models: dict[str, Path] | Path | None) -> dict:
    """Per stream (or "*" for all) the model's kind, input and thresholds, as the page shows them."""
    if models is None:
        return {}
    items = models.items() if isinstance(models, dict) else [("*", models)]
    out = {}
    for stream, model in items:
        manifest = json.loads((Path(model) / "manifest.json").read_text())
        thresholds = json.loads((Path(model) / "thresholds.json").read_text())
        out[stream] = {"model": str(model), "kind": manifest["kind"],
                       "input": [manifest["input"]["height"], manifest["input"]["width"]],
                       "image_threshold": thresholds["image"]["threshold"], "pixel_threshold":
                       thresholds["pixel"]["threshold"], "normal_images": thresholds.get("n_images"),
                       "rule": thresholds["method"]}
    return out


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lineguard</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em; background: #f6f6f4; }
.stream { background: white; border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin: 0 0 1em; }
.stream h2 { margin: 0 0 0.4em; } .stats span { margin-right: 1.2em; } .drift { color: #b00; font-weight: bold; }
table { border-collapse: collapse; font-size: 12px; } td, th { padding: 1px 8px; border-bottom: 1px solid #eee; }
.defect { color: #b00; } .error { color: #a60; } img { max-width: 320px; float: right; margin-left: 1em; }
#models { font-size: 12px; color: #555; }
</style></head>
<body><h1>lineguard</h1><div id="models"></div><div id="streams">waiting for results...</div>
<script>
function esc(v) { return String(v).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function num(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
async function update() {
  try {
    const state = await (await fetch("/state.json", {cache: "no-store"})).json();
    document.getElementById("models").innerHTML = Object.entries(state.models).map(([s, m]) =>
      `<div>${esc(s)}: ${esc(m.kind)} model ${esc(m.model)}, input ${m.input.join("x")}, image threshold
       ${num(m.image_threshold, 4)} (${esc(m.rule)})</div>`).join("");
    const html = Object.entries(state.streams).map(([name, s]) => `
      <div class="stream" id="stream-${esc(name)}">
        ${s.latest_defect === null ? "" : `<img alt="latest defect" src="/latest/${encodeURIComponent(name)}.jpg?seq=${s.latest_defect}">`}
        <h2>${esc(name)}</h2>
        <div class="stats"><span>results <b class="results">${s.results}</b></span>
          <span>ok <b class="ok">${s.ok}</b></span><span>defect <b class="defects">${s.defect}</b></span>
          <span>error <b class="errors">${s.error}</b></span><span>lost <b class="lost">${s.lost}</b></span>
          <span><b class="fps">${num(s.fps, 1)}</b> frames/s</span>
          <span>defect rate <b>${num(100 * s.defect_rate, 1)} %</b></span>
          <span>latency p50 / p99 ${s.latency_ms ? num(s.latency_ms.p50, 0) + " / " + num(s.latency_ms.p99, 0) : "-"} ms</span></div>
        ${s.drift && s.drift.alarm ? `<div class="drift">DRIFT: scores no longer look like the calibration's
          (KS D ${num(s.drift.statistic, 2)}): re-calibrate</div>` : ""}
        <table><tr><th>seq</th><th>verdict</th><th>score</th><th>regions</th><th>file / error</th></tr>
        ${s.recent.map(r => `<tr class="${r.verdict}"><td>${r.seq}</td><td>${r.verdict}${r.late ? " (late)" : ""}</td>
          <td>${num(r.score, 3)}</td><td>${r.regions}</td><td>${esc(r.error || r.file || "")}</td></tr>`).join("")}
        </table><div style="clear: both"></div></div>`).join("");
    document.getElementById("streams").innerHTML = html || "waiting for results...";
    document.body.dataset.updated = state.t;
  } catch (e) { /* the sink may be gone at the end of a run: keep the last view */ }
}
update(); setInterval(update, 500);
</script></body></html>
"""
