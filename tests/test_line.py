"""A line from one file: two streams, two product models, one sink; and every bad key named."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from calibration.maps import normalise
from calibration.model import Inspector, Model
from calibration.synthetic import make_dataset
from engines.errors import ConfigError
from engines.runtimes import Deployment
from pipeline.cli import main
from pipeline.linefile import load_line
from pipeline.producers import SyntheticSource
from pipeline.run import Line, Product, Stream, auto_workers, run_pipeline


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> Path:
    """Another product: smaller frames, its own model."""
    data = make_dataset(tmp_path_factory.mktemp("data2") / "other", n_train=10, n_good=2, n_defect=2, size=96, seed=7)
    out = tmp_path_factory.mktemp("models2") / "other"
    assert main(["fit", str(data), "-o", str(out), "--input-size", "96", "--threads", "2"]) == 0
    return out


def write_line(folder: Path, text: str) -> Path:
    path = folder / "line.toml"
    path.write_text(text)
    return path


def test_two_streams_each_scored_by_its_own_model(fitted_model, second_model, tmp_path):
    line = load_line(write_line(tmp_path, f"""
out = "out"
[products.weave]
model = "{fitted_model}"
[products.other]
model = "{second_model}"
batch = 4
[[streams]]
name = "cam0"
source = "synthetic"
product = "weave"
frames = 60
[[streams]]
name = "cam1"
source = "synthetic"
product = "other"
frames = 40
"""))
    summary = run_pipeline(line)
    streams = summary["streams"]
    assert (summary["results"], summary["frames_in"], summary["lost"]) == (100, 100, 0)
    for name, frames in (("cam0", 60), ("cam1", 40)):
        assert streams[name]["expected"] == frames == streams[name]["ok"] + streams[name]["defect"] + streams[name]["error"]
    for verdict in ("ok", "defect", "error"):
        assert summary[verdict] == streams["cam0"][verdict] + streams["cam1"][verdict]

    lines = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    scores = {(r["stream"], r["seq"]): r["score"] for r in lines}
    assert sorted(scores) == [("cam0", i) for i in range(60)] + [("cam1", i) for i in range(40)]
    # the verdicts come from each stream's own model: score the same synthetic frames with both models here
    models = {"weave": Model(fitted_model), "other": Model(second_model)}
    for stream, product, frames in (("cam0", "weave", 60), ("cam1", "other", 40)):
        size = models[product].manifest["frame"][0]
        images = [item.pixels for item in SyntheticSource(frames, size=size, seed=0)]
        for name, model in models.items():
            with Inspector(model, Deployment(threads=1), 8) as inspector:
                expected = [float(normalise(r.score, model.thresholds["image"]))
                            for i in range(0, frames, 8) for r in inspector.inspect(images[i:i + 8])]
            got = [scores[stream, i] for i in range(frames)]
            close = np.isclose(got, expected, atol=2e-3)
            assert close.all() if name == product else not close.all(), (stream, name)


@pytest.mark.parametrize("body, message", [
    ('[products.a]\nmodel = "{m}"\nwrkers = 2\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n',
     "products.a.wrkers is not a line-file key"),
    ('[products.a]\nmodel = "{m}"\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "b"\n',
     "product 'b' is not one of the line's products"),
    ('[products.a]\nmodel = "{m}"\nworkers = "two"\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n',
     "products.a.workers must be a int"),
    ('[products.a]\nmodel = "nowhere"\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n',
     "products.a.model 'nowhere': no model there"),
    ('[products.a]\nmodel = "{m}"\n[[streams]]\nname = "c"\nsource = "camera:x"\nproduct = "a"\n',
     r"streams\[0\]: camera source 'camera:x'"),
    ('[products.a]\nmodel = "{m}"\n[[streams]]\nname = "c"\nproduct = "a"\n', r"streams\[0\].source is missing"),
    ('[products.a]\nmodel = "{m}"\nprecision = "fp64"\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n',
     "products.a: .*fp64"),
    ('[products.a]\nmodel = "{m}"\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n'
     '[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n', "stream names must differ: 'c' given more than once"),
    ('metrics_port = 65533\n[products.a]\nmodel = "{m}"\nworkers = 1\n[[streams]]\nname = "c"\nsource = "synthetic"\nproduct = "a"\n',
     "needs ports 65533..65537"),
    ('[products.a\nmodel = 1\n', "not valid TOML"),
])
def test_a_bad_line_file_names_the_key(fitted_model, tmp_path, body, message):
    path = write_line(tmp_path, body.replace("{m}", str(fitted_model)))
    with pytest.raises(ConfigError, match=message) as caught:
        load_line(path)
    assert str(path) in str(caught.value)


def test_run_takes_a_model_or_a_line_not_both(fitted_model, tmp_path, capsys):
    path = write_line(tmp_path, f'[products.a]\nmodel = "{fitted_model}"\n[[streams]]\nname = "c"\n'
                                f'source = "synthetic"\nproduct = "a"\nframes = 5\n')
    assert main(["run", str(fitted_model), "--line", str(path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert "--line" in capsys.readouterr().err
    # run's own options would be ignored with a line file: refused, naming them and where they go
    assert main(["run", "--line", str(path), "--out", str(tmp_path / "o"), "--no-respawn", "--frames", "3"]) == 2
    err = capsys.readouterr().err
    assert "--frames, --out, --no-respawn would be ignored with --line" in err and str(path) in err
    assert main(["run", "--line", str(path)]) == 0
    line = load_line(write_line(tmp_path, 'respawn = false\nready_timeout = 300\n' + path.read_text()))
    assert line.respawn is False and line.ready_timeout == 300.0


def test_workers_set_to_auto_get_one_per_core_on_the_cpu_and_one_on_a_gpu(tmp_path):
    cpu = Deployment()
    gpu = SimpleNamespace(device="cuda", threads=None)  # a Deployment on cuda needs a visible GPU to be made
    assert auto_workers(cpu, 1, cores=2) == 2
    assert auto_workers(Deployment(threads=2), 1, cores=8) == 4  # one per `threads` cores
    assert auto_workers(cpu, 2, cores=8) == 4  # the cores split among the line's CPU products
    assert auto_workers(cpu, 1, cores=64) == 8  # bounded
    assert auto_workers(cpu, 3, cores=2) == 1 and auto_workers(Deployment(threads=4), 1, cores=2) == 1
    assert auto_workers(gpu, 1, cores=16) == 1
    with pytest.MonkeyPatch.context() as patch:  # unset cores: what this process may use, a container's quota
        patch.setattr("pipeline.run.usable_cores", lambda: 3)
        assert auto_workers(cpu, 1) == 3
    line = Line((Product("a", tmp_path, workers=0), Product("b", tmp_path, workers=3)),
                (Stream("s", "synthetic", "a"),))
    assert [p.workers for p in line.products] == [auto_workers(cpu, 2), 3]
    assert line.ports_needed == 2 + 1 + 2 + sum(p.workers for p in line.products)
    with pytest.raises(ConfigError, match="workers >= 0"):
        Product("a", tmp_path, workers=-1)


def test_the_run_folder_keeps_ipc_paths_within_a_unix_socket_address(tmp_path):
    """A deep TMPDIR would make the sockets' paths longer than a Unix socket address (107 bytes): the
    run's folder then goes to the next short base; with none, one error names TMPDIR and the fix."""
    from pipeline.run import IPC_NAME_MAX, ipc_folder

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    folder = ipc_folder((str(deep), str(Path(tempfile.gettempdir()))))
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("lineguard-run-")
        assert len(str(folder / ("x" * IPC_NAME_MAX)).encode()) <= 107
    finally:
        folder.rmdir()
    with pytest.raises(ConfigError, match="set TMPDIR to a short folder"):
        ipc_folder((str(deep),))


def test_a_run_with_a_deep_tmpdir_and_names_no_path_allows(fitted_model, tmp_path, monkeypatch):
    """Stream and product names are the user's (spaces, slashes, any length): the endpoints are named
    by index, and the run's folder moves out of a TMPDIR too deep for ipc sockets."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    product = "a product/with a name longer than any socket path could hold " * 2
    line = Line((Product(product, fitted_model, workers=1),),
                (Stream("line 3 / camera 7", "synthetic", product, frames=12),), out=tmp_path / "out")
    summary = run_pipeline(line)
    assert (summary["results"], summary["lost"], summary["error"]) == (12, 0, 0)
    assert not list(deep.iterdir())  # nothing was made under the deep folder


def test_a_stream_name_with_an_equals_sign_is_refused_with_a_name_that_works(fitted_model):
    """The sink is given each stream's model as STREAM=MODEL: a name with '=' would be split there."""
    with pytest.raises(ConfigError, match="stream name 'line=3' contains '='; name it without one .*'line-3'"):
        Stream("line=3", "synthetic", "a")


def test_a_stream_named_like_a_path_runs(fitted_model, tmp_path):
    """Stream names become file names (stage logs, defect maps, overlays): one with a '/' runs, its files
    inside their folders (its stage log could not be made: the run failed once every worker had loaded)."""
    from pipeline.cli import main

    out = tmp_path / "out"
    assert main(["run", str(fitted_model), "--source", "synthetic", "--frames", "24", "--stream", "line1/cam0",
                 "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and {r["stream"] for r in lines} == {"line1/cam0"}
    assert all(p.parent == out / "maps" for p in (out / "maps").rglob("*")) and any((out / "maps").iterdir())
