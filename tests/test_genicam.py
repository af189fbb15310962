"""GenICam sources against a real GigE Vision camera simulator on loopback (Aravis'
arv-fake-gv-camera-0.8, Debian package aravis-tools): discovery, settings read back, pixel
formats, a camera that goes away and comes back, and a whole run with every frame accounted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import pytest

from engines.errors import ConfigError
from pipeline.cli import main

FAKE = shutil.which("arv-fake-gv-camera-0.8")


def _aravis_missing() -> str | None:
    if FAKE is None:
        return "arv-fake-gv-camera-0.8 not found (apt-get install aravis-tools)"
    try:
        from pipeline.genicam import aravis

        aravis()
    except ConfigError as exc:
        return str(exc)
    return None


MISSING = _aravis_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no GenICam stack: {MISSING}")


class FakeCamera:
    """The simulator on 127.0.0.1 (one at a time: they share the GVCP port), by serial; it can be unplugged."""

    def __init__(self, serial: str):
        self.serial, self.proc = serial, None
        self.start()

    def start(self) -> None:
        from pipeline.genicam import list_cameras

        self.proc = subprocess.Popen([FAKE, "-i", "127.0.0.1", "-s", self.serial], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(c["serial"] == self.serial for c in list_cameras()):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"the camera simulator exited ({self.proc.returncode}); is UDP 3956 on 127.0.0.1 taken?")
            time.sleep(0.3)
        self.stop()
        pytest.fail("the camera simulator never showed up in discovery")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def fake():
    cam = FakeCamera("LG" + uuid.uuid4().hex[:6].upper())
    yield cam
    cam.stop()


@pytest.fixture
def camera(fake) -> str:
    return fake.serial


def test_discovery_lists_the_camera(camera, capsys):
    from pipeline.genicam import list_cameras

    (found,) = [c for c in list_cameras() if c["serial"] == camera]
    assert found["address"] == "127.0.0.1" and found["protocol"] == "GigEVision" and found["vendor"] == "Aravis"
    assert main(["cameras"]) == 0
    assert f"--source genicam:{camera}" in capsys.readouterr().out


@pytest.mark.parametrize("pixel_format", ["Mono8", "BayerRG8", "RGB8"])
def test_settings_are_set_and_read_back_into_each_frame(camera, pixel_format):
    from pipeline.producers import open_source

    source = open_source(f"genicam:{camera}", frames=4,
                         camera={"exposure": "5000", "fps": "40", "pixel_format": pixel_format, "Width": "256"})
    try:
        frames = list(source)
    finally:
        source.close()
    assert len(frames) == 4 and source.missed == 0
    ids = [f.meta["frame_id"] for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 4
    for f in frames:
        channels = 1 if pixel_format == "Mono8" else 3  # a Mono camera's frames travel grey (a third of the bytes)
        assert f.pixels.shape[1:] == (256, channels) and f.pixels.dtype.name == "uint8"
        assert f.meta["camera"]["exposure"] == pytest.approx(5000) and f.meta["camera"]["fps"] == pytest.approx(40)
        assert f.meta["camera"]["pixel_format"] == pixel_format and f.meta["timestamp_ns"] > 0


def test_software_trigger_delivers_a_frame_per_trigger(camera):
    from pipeline.producers import open_source

    source = open_source(f"genicam:{camera}", frames=3, camera={"trigger": "software", "pixel_format": "Mono8"})
    try:
        frames = list(source)
    finally:
        source.close()
    assert len(frames) == 3 and frames[0].meta["camera"]["trigger"] == "software"


@pytest.mark.parametrize("spec, settings, message", [
    ("genicam:NOSUCHCAM", {}, "not found; found: .*serial"),
    ("genicam:{cam}", {"gain": "lots"}, "gain takes a number"),
    ("genicam:{cam}", {"NoSuchFeature": "1"}, "NoSuchFeature"),
    ("genicam:{cam}", {"pixel_format": "YUV422"}, "pixel_format=YUV422"),
    ("genicam:", {}, "expected genicam:SERIAL"),
])
def test_bad_cameras_and_settings_are_named(camera, spec, settings, message):
    from pipeline.producers import open_source

    with pytest.raises(ConfigError, match=message):
        open_source(spec.replace("{cam}", camera), frames=1, camera=settings).close()


def test_a_camera_that_goes_away_is_reopened(fake):
    from pipeline.producers import GenICamSource

    source = GenICamSource(fake.serial, {"fps": "50"}, limit=20, timeout_s=0.5, give_up_s=30)
    frames = []
    try:
        for frame in source:
            frames.append(frame)
            if len(frames) == 10:  # unplugged, and plugged in again two seconds later
                fake.stop()
                time.sleep(2.0)
                fake.start()
    finally:
        source.close()
    assert len(frames) == 20 and source.reconnects >= 1


def test_a_run_from_a_camera_accounts_for_every_frame(camera, fitted_model, tmp_path):
    out = tmp_path / "out"
    code = main(["run", str(fitted_model), "--source", f"genicam:{camera}", "--frames", "40", "--camera",
                 "fps=30,pixel_format=Mono8", "--out", str(out), "--json", str(tmp_path / "summary.json")])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # a live source drops the oldest frame when the line falls behind (a loaded machine at start-up):
    # every frame taken from the camera is a verdict or counted as dropped, and what was sent is never lost
    sent = summary["frames_in"]
    assert sent + summary["dropped"] == 40 and sent >= 30
    assert summary["results"] == sent and summary["lost"] == 0 and summary["error"] == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(sent))
    ids = [r["meta"]["frame_id"] for r in lines]
    assert ids == sorted(ids) and lines[0]["meta"]["camera"]["pixel_format"] == "Mono8"
