"""fit + eval through the CLI on synthetic data with planted defects, and the CLI's errors."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from calibration.dataset import evaluation_samples
from calibration.metrics import roc_auc
from pipeline.cli import main


def test_fit_eval_round_trip_finds_planted_defects(fitted_model, synthetic_data, tmp_path, capsys):
    manifest = json.loads((fitted_model / "manifest.json").read_text())
    assert manifest["kind"] == "memory_bank" and manifest["format_version"] == 2
    assert manifest["input"] == {"height": 128, "width": 128, "channels": 3, "layout": "NHWC", "dtype": "uint8"}
    assert manifest["maps"]["stride"] == 8 and manifest["frame"] == [128, 128]
    assert manifest["fit"]["bank_size"] == round(0.25 * 12 * 16 * 16)
    thresholds = json.loads((fitted_model / "thresholds.json").read_text())
    assert thresholds["image"]["threshold"] > thresholds["image"]["min"] > 0

    out = tmp_path / "metrics.json"
    code = main(["eval", str(fitted_model), str(synthetic_data), "--json", str(out), "--maps", str(tmp_path / "maps"),
                 "--scores", str(tmp_path / "scores"), "--threads", "2"])
    assert code == 0
    table = capsys.readouterr().out
    assert "image_auroc" in table and "pixel_aupro" in table
    result = json.loads(out.read_text())
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_iou_max",
                "pixel_aupro"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_images"] == 4 + 3 * 3 and result["images_per_s"] > 0
    assert result["config"]["kind"] == "memory_bank"
    assert result["config"]["memory_bank"]["embedding"]["backbone"] == "efficientnet_lite0"
    assert result["config"]["fit"]["bank_size"] == 768
    # what a quality engineer asks next: per defect type, and the rates at the calibrated threshold
    assert set(result["per_type"]) == {"hole", "scratch", "stain"}
    assert result["false_reject"]["of"] == 4 and result["miss"]["of"] == 9
    assert result["miss"]["count"] == sum(t["miss"]["count"] for t in result["per_type"].values())
    plots = [tmp_path / "metrics-product-curves.png"]  # <json stem>-<dataset>-curves.png
    assert [str(p) for p in plots] == result["curve_plots"] and cv2.imread(str(plots[0])) is not None
    # the planted defects must be found, in the image and in the pixels
    assert result["image_auroc"] >= 0.95
    assert result["pixel_auroc"] >= 0.9 and result["pixel_aupro"] >= 0.7

    samples = evaluation_samples(synthetic_data)
    scores = []
    for sample in samples:
        tiff = tmp_path / "scores" / sample.rel.replace(".png", ".tiff")
        score_map = cv2.imread(str(tiff), cv2.IMREAD_UNCHANGED)
        assert score_map.dtype == np.float32 and score_map.shape == (128, 128)
        overlay = tmp_path / "maps" / sample.rel.replace(".png", ".jpg")  # one dataset: no category folder
        assert cv2.imread(str(overlay)).shape == (128, 128, 3)
        scores.append(score_map.max())
    # the written maps are the ones the metrics were computed on: recompute pixel AUROC from them
    maps = [cv2.imread(str(tmp_path / "scores" / s.rel.replace(".png", ".tiff")), cv2.IMREAD_UNCHANGED) for s in samples]
    masks = [np.zeros((128, 128), bool) if s.mask_path is None else cv2.imread(str(s.mask_path), 0) > 0 for s in samples]
    pixel = roc_auc(np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks]))
    assert pixel == pytest.approx(result["pixel_auroc"], abs=1e-6)


def test_eval_of_an_roi_model_scores_the_pixels_inside_it(synthetic_data, tmp_path):
    """--roi restricts scoring and reporting: eval's pixel AUROC is that of the written score maps and
    the masks over the region's pixels alone (outside, the map is 0 and would count as easy normal
    pixels, or defect pixels as misses)."""
    model = tmp_path / "left"
    assert main(["fit", str(synthetic_data), "-o", str(model), "--input-size", "64", "--roi", "0,0,64,128"]) == 0
    assert main(["eval", str(model), str(synthetic_data), "--json", str(tmp_path / "m.json"),
                 "--scores", str(tmp_path / "scores")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    samples = evaluation_samples(synthetic_data)
    maps = [cv2.imread(str(tmp_path / "scores" / s.rel.replace(".png", ".tiff")), cv2.IMREAD_UNCHANGED) for s in samples]
    masks = [np.zeros((128, 128), bool) if s.mask_path is None else cv2.imread(str(s.mask_path), 0) > 0 for s in samples]
    inside = np.zeros((128, 128), bool)
    inside[:, :64] = True
    pixel = roc_auc(np.concatenate([m[inside] for m in maps]), np.concatenate([k[inside] for k in masks]))
    assert pixel == pytest.approx(result["pixel_auroc"], abs=1e-6)
    whole = roc_auc(np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() for k in masks]))
    assert whole != pytest.approx(pixel, abs=1e-3)  # the check tells the two apart


def test_eval_pixel_metrics_from_maps_made_again(fitted_model, synthetic_data, monkeypatch):
    """A test set too large to keep: eval's PixelSet keeps no keys and ranks in chunks of 500 pixels,
    making each frame map again from its canvas map for every chunk; the metrics, per type too, are
    the ones of keeping every map."""
    from calibration import evaluate, metrics
    from calibration.model import Model

    kept = evaluate.evaluate(Model(fitted_model), synthetic_data)
    made = []

    class Small(metrics.PixelSet):
        def __init__(self, **kw):
            super().__init__(chunk_pixels=500, cache_pixels=0, **kw)

        def _keys(self, i):
            made.append(i)
            return super()._keys(i)

    monkeypatch.setattr(metrics, "PixelSet", Small)
    again = evaluate.evaluate(Model(fitted_model), synthetic_data)
    assert len(made) > 10 * kept["n_images"]  # every map made again, chunk after chunk
    for key in ("pixel_auroc", "pixel_f1max", "pixel_iou_max"):
        assert again[key] == kept[key]
    for key in ("pixel_ap", "pixel_aupro"):
        assert again[key] == pytest.approx(kept[key], rel=1e-9)
    for t, m in kept["per_type"].items():
        assert again["per_type"][t]["pixel_auroc"] == m["pixel_auroc"]
        assert again["per_type"][t]["pixel_aupro"] == pytest.approx(m["pixel_aupro"], rel=1e-9)


def test_torch_runtime_scores_like_onnxruntime(fitted_model, synthetic_data, tmp_path):
    results = {}
    for runtime in ("onnxruntime", "torch"):
        out = tmp_path / f"{runtime}.json"
        assert main(["eval", str(fitted_model), str(synthetic_data), "--runtime", runtime, "--json", str(out)]) == 0
        results[runtime] = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert results["torch"][key] == pytest.approx(results["onnxruntime"][key], abs=2e-3)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_fit_without_train_good(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m")]) == 2
    line = _error_line(capsys)
    assert "train/good" in line and str(tmp_path / "empty") in line


def test_fit_unreadable_image_is_named(synthetic_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    bad = data / "train" / "good" / "005.png"
    bad.write_bytes(b"not an image at all")
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), "--input-size", "64"]) == 2
    assert str(bad) in _error_line(capsys)


def test_unknown_backbone_lists_valid_names(synthetic_data, tmp_path, capsys):
    assert main(["fit", str(synthetic_data), "-o", str(tmp_path / "m"), "--backbone", "resnet9000"]) == 2
    line = _error_line(capsys)
    assert "resnet9000" in line and "efficientnet_lite0" in line and "wide_resnet50_2" in line


def test_bad_options_are_refused(synthetic_data, tmp_path, capsys):
    assert main(["fit", str(synthetic_data), "-o", str(tmp_path / "m"), "--coreset-ratio", "1.5"]) == 2
    assert "coreset ratio" in _error_line(capsys)
    assert main(["fit", str(synthetic_data), "-o", str(tmp_path / "m"), "--input-size", "100"]) == 2
    assert "multiple of 32" in _error_line(capsys)
    assert main(["fit", str(synthetic_data), "-o", str(tmp_path / "m"), "--layers", "stage2,stage9"]) == 2
    assert "stage9" in _error_line(capsys)


def test_fit_refuses_to_overwrite_foreign_directory(synthetic_data, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    assert main(["fit", str(synthetic_data), "-o", str(target)]) == 2
    assert "not a lineguard model" in _error_line(capsys)
    assert (target / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("damage", ["alter_bank", "delete_onnx", "garbage_manifest", "future_version"])
def test_damaged_model_is_reported(fitted_model, synthetic_data, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    if damage == "alter_bank":
        with open(model / "bank.faiss", "r+b") as f:
            f.seek(100)
            f.write(b"\x01\x02\x03")
        expected = "bank.faiss"
    elif damage == "delete_onnx":
        (model / "model.onnx").unlink()
        expected = "model.onnx"
    elif damage == "garbage_manifest":
        (model / "manifest.json").write_text("{not json")
        expected = "manifest.json"
    else:
        manifest = json.loads((model / "manifest.json").read_text())
        manifest["format_version"] = 99
        (model / "manifest.json").write_text(json.dumps(manifest))
        expected = "version 99"
    assert main(["eval", str(model), str(synthetic_data)]) == 2
    assert expected in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="train/good"):
        main(["--debug", "fit", str(tmp_path), "-o", str(tmp_path / "m")])


def test_wrong_image_shape_for_model_is_named(fitted_model):
    from calibration.model import Model
    from engines.errors import InputError
    from engines.runtimes import Deployment

    with Model(fitted_model).detector(Deployment()) as detector:
        with pytest.raises(InputError, match=r"\[N, 128, 128, 3\]"):
            detector.maps(np.zeros((1, 256, 256, 3), np.uint8))


@pytest.mark.parametrize("flags, field, value", [
    (["--dim", "0"], "dim", 0),
    (["--coreset-max", "0"], "coreset_max", 0),
    (["--rerank", "0"], "rerank", 0),
])
def test_fit_flags_of_zero_are_values_not_absent(flags, field, value):
    """`--dim 0` (every channel) and `--coreset-max 0` (no bound) reach the options, not the defaults."""
    from calibration.memory_bank import BankOptions
    from pipeline.cli import _kind_options, build_parser

    options = _kind_options(build_parser().parse_args(["fit", "data", "-o", "model", *flags]))
    def read(o):
        return next(getattr(part, field) for part in (o.embedding, o.bank, o) if hasattr(part, field))

    assert read(options) == value != read(BankOptions())


@pytest.mark.parametrize("dim", [152, 200])
def test_a_dim_of_every_channel_or_more_keeps_every_channel(synthetic_data, tmp_path, dim):
    """Lite0's stages 2 + 4 give 152 channels: --dim 152 (a learned rotation the served graph did not
    apply: the bank's vectors and the served ones disagreed, image AUROC 0.17 to 0.75) and --dim 200 (an
    IndexError) both mean every channel, as --dim 0, and detect as it does."""
    model = tmp_path / "m"
    assert main(["fit", str(synthetic_data), "-o", str(model), "--input-size", "128", "--coreset-ratio", "0.25",
                 "--dim", str(dim)]) == 0
    manifest = json.loads((model / "manifest.json").read_text())["memory_bank"]
    assert manifest["embedding"]["dim"] == 0 and manifest["feature_dim"] == 152
    assert not (model / "projection.npy").exists()
    assert main(["eval", str(model), str(synthetic_data), "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9


def test_bank_search_flags_reach_the_bank_config():
    from pipeline.cli import _kind_options, build_parser

    options = _kind_options(build_parser().parse_args(
        ["fit", "data", "-o", "model", "--index", "ivf", "--ef-construction", "40", "--ef-search", "9", "--rerank", "5"]))
    assert (options.bank.index, options.bank.ef_construction, options.bank.ef_search, options.bank.rerank) == (
        "ivf", 40, 9, 5)


def test_fit_takes_the_ivf_lists_and_probes(synthetic_data, tmp_path):
    import faiss

    out = tmp_path / "ivf"
    assert main(["fit", str(synthetic_data), "-o", str(out), "--input-size", "64", "--coreset-ratio", "1",
                 "--index", "ivf", "--nlist", "3", "--nprobe", "2"]) == 0
    bank = json.loads((out / "manifest.json").read_text())["memory_bank"]["bank"]
    assert (bank["index"], bank["nlist"], bank["nprobe"]) == ("ivf", 3, 2)
    assert faiss.extract_index_ivf(faiss.read_index(str(out / "bank.faiss"))).nlist == 3


def test_fit_by_default_keeps_the_index_it_timed_faster_and_says_so(fitted_model):
    """Index auto: the manifest names the kind the bank file holds and both kinds' timings."""
    import faiss

    section = json.loads((fitted_model / "manifest.json").read_text())["memory_bank"]
    timing = section["index_timing"]
    assert set(timing) == {"hnsw", "ivf"} and all(t["ms_per_1024"] > 0 for t in timing.values())
    assert timing["ivf"]["exact_share"] >= timing["hnsw"]["exact_share"] and timing["ivf"]["nprobe"] >= 1
    kept = section["bank"]["index"]
    assert kept == min(timing, key=lambda kind: timing[kind]["ms_per_1024"])
    assert kept == "hnsw" or section["bank"]["nprobe"] == timing["ivf"]["nprobe"]
    held = faiss.read_index(str(fitted_model / "bank.faiss"))
    assert isinstance(held, faiss.IndexIVFFlat if section["bank"]["index"] == "ivf" else faiss.IndexHNSWSQ)


def test_stage_processes_start_without_torch_or_onnx(fitted_model):
    """A run's producer, sink and postprocess processes parse their command line, load the model and
    decide a defective frame, and its ONNX Runtime workers score frames on an IVF or HNSW bank, without
    importing torch or onnx (2.4 s of imports each, which made a 108-frame run take 16 s instead of 5)."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from pipeline.cli import build_parser
for argv in (["produce", "synthetic", "--frames-endpoint", "ipc://f", "--sink", "ipc://s"],
             ["sink", "--results", "ipc://r", "--model", {str(fitted_model)!r}],
             ["postprocess", {str(fitted_model)!r}, "--in", "ipc://i", "--sink", "ipc://s"]):
    build_parser(argv[0]).parse_args(argv)
from calibration.model import Model
from pipeline.drift import drift_reference
model = Model({str(fitted_model)!r})
drift_reference({str(fitted_model)!r})
decision = model.decide(np.full((16, 16), 1e6, np.float32), (128, 128), 1e6)
assert decision.verdict == "defect" and decision.regions, decision
from calibration.model import Inspector
from engines.runtimes import Deployment
assert model.manifest["memory_bank"]["bank"]["index"] in ("ivf", "hnsw")
with Inspector(model, Deployment(threads=1), 2) as inspector:  # an inference worker: ONNX Runtime and FAISS
    inspector.inspect([np.zeros(model.spec.shape, np.uint8)] * 2)
print(",".join(m for m in ("torch", "onnx") if m in sys.modules) or "neither")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "neither"


def test_fit_says_when_map_cells_are_coarse_for_the_frames(synthetic_data, tmp_path, capsys):
    """128-pixel frames at a 32-pixel input: a cell covers 32 frame pixels, and fit names the tiles that halve it."""
    assert main(["fit", str(synthetic_data), "-o", str(tmp_path / "m"), "--input-size", "32", "--coreset-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "cell pixels 32.0, inputs per frame 1" in out
    assert "note: a map cell covers 32 pixels of these frames" in out and "--tiles --tile-scale 0.5 halves that" in out


def test_an_output_path_the_system_refuses_is_one_line_before_the_work(fitted_model, synthetic_data, tmp_path, capsys,
                                                                       monkeypatch):
    """A file where a folder must be (or a missing, read-only or forbidden place): exit 2, one line naming
    the path, and eval fails before it scores, not after."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def never(*args, **kwargs):
        raise AssertionError("scored before its output was found unwritable")

    monkeypatch.setattr("calibration.evaluate.evaluate", never)
    for argv in (["eval", str(fitted_model), str(synthetic_data), "--json", str(blocker / "m.json")],
                 ["eval", str(fitted_model), str(synthetic_data), "--maps", str(blocker / "maps")],
                 ["run", str(fitted_model), "--source", "synthetic", "--frames", "4", "--out", str(blocker / "out")],
                 ["fit", str(synthetic_data), "-o", str(blocker / "model")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lineguard: error: {blocker}") and "Not a directory" in err[0]


def test_eval_of_a_test_set_a_metric_is_undefined_on_reports_the_rest(fitted_model, synthetic_data, tmp_path, capsys):
    """Test sets a real line has: no defect yet (only test/good: its false rejects are the point), no good
    images, or a defect type labelled by image only (empty masks). What cannot be measured is n/a, with
    why; the rest is measured, not a traceback."""
    cases = {"only-good": lambda d: [shutil.rmtree(p) for p in (d / "test").iterdir() if p.name != "good"],
             "no-good": lambda d: shutil.rmtree(d / "test" / "good"),
             "empty-masks": lambda d: [cv2.imwrite(str(m), np.zeros_like(cv2.imread(str(m), cv2.IMREAD_UNCHANGED)))
                                       for m in (d / "ground_truth").rglob("*.png")]}
    results = {}
    for name, change in cases.items():
        data = tmp_path / name / "product"
        shutil.copytree(synthetic_data, data)
        change(data)
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(fitted_model), str(data), "--json", str(out)]) == 0, name
        assert "n/a" in capsys.readouterr().out
        results[name] = json.loads(out.read_text())
    good = results["only-good"]
    assert good["image_auroc"] is None and good["pixel_auroc"] is None and len(good["undefined"]) == 2
    assert good["false_reject"]["of"] == good["n_images"] > 0 and good["per_type"] == {}
    no_good = results["no-good"]
    assert no_good["image_auroc"] is None and no_good["false_reject"]["of"] == 0
    assert 0.5 < no_good["pixel_auroc"] <= 1 and all(t["image_auroc"] is None for t in no_good["per_type"].values())
    empty = results["empty-masks"]
    assert empty["image_auroc"] > 0.5 and empty["pixel_auroc"] is None and empty["undefined"] == [
        "pixel metrics: the masks need defect pixels (and normal ones)"]
    assert all(t["pixel_auroc"] is None and t["image_auroc"] is not None for t in empty["per_type"].values())


def test_a_full_disk_is_one_line_saying_so(fitted_model, synthetic_data, tmp_path, capsys, monkeypatch):
    """A write the disk refuses names no file (ENOSPC): still one line, with what to do, not a traceback."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("calibration.evaluate.evaluate", full)
    assert main(["eval", str(fitted_model), str(synthetic_data), "--json", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lineguard: error: {os.strerror(errno.ENOSPC)}; free space on the disk and run again; "
                   "--debug shows where"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, MemoryError])
def test_a_fit_that_stops_midway_leaves_the_earlier_model_whole(fitted_model, synthetic_data, tmp_path, monkeypatch,
                                                                failure):
    """A fit is written beside its output and put in place once whole: interrupted (Ctrl-C) or failed
    after the network and the bank were written, the earlier model is untouched and nothing is left
    behind; a finished fit then replaces it, with no file of the earlier one left over."""
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    (model / "engines").mkdir(exist_ok=True)
    (model / "engines" / "stale.json").write_text("{}")
    before = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise failure()

    with monkeypatch.context() as patch:
        patch.setattr("calibration.fit.calibrate", fail)
        argv = ["fit", str(synthetic_data), "-o", str(model), "--input-size", "64", "--coreset-ratio", "0.5"]
        if failure is KeyboardInterrupt:
            assert main(argv) == 130  # "lineguard: interrupted"
        else:
            with pytest.raises(failure):
                main(argv)
    assert {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert main(["fit", str(synthetic_data), "-o", str(model), "--input-size", "64", "--coreset-ratio", "0.5"]) == 0
    assert json.loads((model / "manifest.json").read_text())["input"]["height"] == 64
    assert not (model / "engines").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_fit_output_is_for_every_reader_follows_a_link_and_clears_what_killed_fits_left(synthetic_data, tmp_path):
    """The model folder gets the umask's permissions (the service that serves it is often another user);
    -o through a symbolic link replaces the model it points to and keeps the link; folders a fit killed
    outright left beside -o are removed, those of a fit still running are not."""
    import subprocess

    models = tmp_path / "models"
    models.mkdir()
    link = tmp_path / "current"
    link.symlink_to(models / "v1")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process holds now
    left = [models / f".v1.writing-{gone.pid}-abc", models / f".v1.replaced-{gone.pid}-def"]
    running = models / f".v1.writing-{os.getppid()}-ghi"
    for folder in (*left, running):
        (folder / "engines").mkdir(parents=True)
    argv = ["fit", str(synthetic_data), "-o", str(link), "--input-size", "64", "--coreset-ratio", "0.5"]
    umask = os.umask(0o022)
    try:
        assert main(argv) == 0
        assert main(argv) == 0  # and again, replacing the model it wrote
    finally:
        os.umask(umask)
    assert link.is_symlink() and (models / "v1" / "manifest.json").is_file()
    assert (models / "v1").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in models.iterdir()) == sorted(["v1", running.name])


def test_a_fit_refuses_the_current_folder_as_its_output(synthetic_data, tmp_path, monkeypatch, capsys):
    """The current folder (a model cannot replace the folder a shell stands in) is refused in one line
    naming the fix, and nothing is written."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["fit", str(synthetic_data), "-o", "."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"output {here} is the current folder" in err[0] and "-o DIR" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not any(here.iterdir())


def test_fuse_may_write_over_one_of_its_members(fitted_model, tmp_path):
    """The fused model is written beside its output: a member's own folder can be the output."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(fitted_model, a)
    shutil.copytree(fitted_model, b)
    assert main(["fuse", str(a), str(b), "-o", str(a)]) == 0
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and (a / "members" / "0" / "bank.faiss").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
