"""Every model kind behind the one detector contract: fitted through the CLI on non-square synthetic
frames with planted defects, found by each kind, served alike by every runtime; few-shot banks,
ensembles, multi-class models, old artifacts, and the errors a user can make."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from calibration.geometry import Geometry
from calibration.int8 import Int8Config, quantize_onnxruntime
from calibration.maps import even_border
from calibration.model import Model
from calibration.synthetic import make_dataset
from engines.head_config import EmbeddingConfig
from engines.runtimes import Deployment
from pipeline.cli import main

INPUT = "64x96"


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """96 x 144 frames (not square), 16 normal training images, 3 planted defects of each type."""
    return make_dataset(tmp_path_factory.mktemp("wide") / "product", n_train=16, n_good=4, n_defect=3, size=96,
                        width=144, period=10.0, seed=3)


@pytest.fixture(scope="module")
def models(wide_data, tmp_path_factory):
    """One fitted model of each kind on the same data: {"memory_bank": dir, "reconstruction": dir}."""
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind, extra in (("memory_bank", ["--coreset-ratio", "0.5"]), ("reconstruction", ["--epochs", "40"])):
        out[kind] = root / kind
        assert main(["fit", str(wide_data), "-o", str(out[kind]), "--kind", kind, "--input-size", INPUT,
                     "--threads", "2", *extra]) == 0
    return out


def _eval(model, data, tmp_path, *args) -> dict:
    out = tmp_path / "m.json"
    assert main(["eval", str(model), *[str(d) for d in (data if isinstance(data, list) else [data])],
                 "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["memory_bank", "reconstruction"])
def test_every_kind_finds_the_planted_defects(kind, models, wide_data, tmp_path):
    model = Model(models[kind])
    assert model.kind.name == kind and (model.spec.height, model.spec.width) == (64, 96)
    result = _eval(models[kind], wide_data, tmp_path)
    assert result["config"]["kind"] == kind and result["config"]["input"] == [64, 96]
    assert result["image_auroc"] >= 0.9, result["image_auroc"]
    assert result["pixel_auroc"] >= 0.85, result["pixel_auroc"]


def _inputs(model: Model, data, n=3) -> np.ndarray:
    from calibration.dataset import evaluation_samples, read_images

    images = list(read_images([s.path for s in evaluation_samples(data)][-n:]))
    out = np.empty((n,) + model.spec.shape, np.uint8)
    for k, image in enumerate(images):
        model.geometer.prepare(image, model.layout(image.shape[:2]), out[k:k + 1])
    return out


RUNTIMES = [
    pytest.param(Deployment("torch"), 1e-3, id="torch-cpu"),
    pytest.param(Deployment("onnxruntime", "int8"), None, id="onnxruntime-int8"),
    pytest.param("torch-cuda-fp16", 3e-2, id="torch-cuda-fp16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("kind", ["memory_bank", "reconstruction"])
@pytest.mark.parametrize("deployment, rel_tol", RUNTIMES)
def test_every_kind_on_every_runtime(kind, deployment, rel_tol, models, wide_data, tmp_path):
    """One conformance test: the same inputs, each runtime's anomaly maps against onnxruntime fp32's."""
    if deployment == "torch-cuda-fp16":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
        deployment = Deployment("torch", "fp16", "cuda", cuda_graphs=True)
    model_dir = tmp_path / kind
    shutil.copytree(models[kind], model_dir)
    if deployment.precision == "int8":
        quantize_onnxruntime(model_dir, config=Int8Config(images=6))
    model = Model(model_dir)
    inputs = _inputs(model, wide_data)
    with model.detector(Deployment()) as reference:
        want = reference.maps(inputs)
    with model.detector(deployment) as detector:
        got = detector.maps(inputs)
    assert got.shape == want.shape == (3, 8, 12) and got.dtype == np.float32
    if rel_tol is None:  # int8: close in shape, not in every value; the floor the export's validation holds
        from calibration.int8 import ValidationBar

        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] >= ValidationBar().map_correlation
    else:
        np.testing.assert_allclose(got, want, rtol=rel_tol, atol=rel_tol * np.abs(want).max())


def test_reconstruction_cost_does_not_grow_with_the_training_set(models, wide_data, tmp_path):
    """Its served graph is the same whatever the number of training images; a bank's grows with it."""
    import onnx

    bigger = make_dataset(tmp_path / "more", n_train=32, n_good=1, n_defect=1, size=96, width=144, period=10.0)
    assert main(["fit", str(bigger), "-o", str(tmp_path / "rec"), "--kind", "reconstruction", "--input-size", INPUT,
                 "--steps", "3"]) == 0

    def weights(path):
        return sum(np.prod(i.dims) for i in onnx.load(str(path / "model.onnx")).graph.initializer)

    assert weights(tmp_path / "rec") == weights(models["reconstruction"])
    assert not (tmp_path / "rec" / "bank.faiss").exists()
    section = json.loads((tmp_path / "rec" / "manifest.json").read_text())["reconstruction"]
    assert section["steps"] == 3 and section["lr"] > 0 and section["schedule"]


def test_reconstruction_fit_is_deterministic_with_a_seed(wide_data, tmp_path):
    for name in ("a", "b"):
        assert main(["fit", str(wide_data), "-o", str(tmp_path / name), "--kind", "reconstruction",
                     "--input-size", INPUT, "--steps", "6", "--seed", "7", "--threads", "2"]) == 0
    import torch

    a = torch.load(tmp_path / "a" / "decoder.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "decoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_few_shot_bank_from_k_images_and_their_views(wide_data, tmp_path):
    assert main(["fit", str(wide_data), "-o", str(tmp_path / "two"), "--shots", "2", "--input-size", INPUT]) == 0
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["memory_bank"]["shots"] == 2 and manifest["memory_bank"]["augment"] == "flips"
    assert manifest["fit"]["frames"] == 2 * 4 and manifest["fit"]["bank_size"] == 2 * 4 * 8 * 12  # every patch
    result = _eval(tmp_path / "two", wide_data, tmp_path)
    assert result["image_auroc"] >= 0.8 and result["pixel_auroc"] >= 0.8
    assert main(["fit", str(wide_data), "-o", str(tmp_path / "one"), "--shots", "1", "--augment", "flips+rot90",
                 "--input-size", "64"]) == 0  # one image: calibration leaves out the view itself
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["fit"]["frames"] == 8


def test_ensemble_serves_as_one_model(models, wide_data, tmp_path):
    out = tmp_path / "ens"
    assert main(["fuse", str(models["memory_bank"]), str(models["reconstruction"]), "-o", str(out)]) == 0
    model = Model(out)
    assert model.kind.name == "ensemble" and len(model.kind.parts(model.dir, model.manifest)) == 2
    result = _eval(out, wide_data, tmp_path)
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.85
    # its maps are the members' maps, border evened as their own, in their own threshold units, averaged
    inputs = _inputs(model, wide_data)
    units = []
    for name in ("memory_bank", "reconstruction"):
        member = Model(models[name])
        with member.detector(Deployment()) as d:
            t = member.thresholds["image"]
            evened = np.stack([even_border(m, member.maps) for m in d.maps(inputs)])
            units.append((evened - t["min"]) / (t["threshold"] - t["min"]))
    with model.detector(Deployment()) as d:
        np.testing.assert_allclose(d.maps(inputs), np.mean(units, axis=0), rtol=1e-4, atol=1e-5)
    # int8 export reaches every member; run serves it like any model
    quantize_onnxruntime(out, config=Int8Config(images=4))
    assert all((p / "engines" / "onnxruntime-int8.onnx").is_file() for p in model.kind.parts(model.dir, model.manifest))
    summary = tmp_path / "run.json"
    assert main(["run", str(out), "--source", str(wide_data / "test"), "--precision", "int8",
                 "--json", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert s["results"] == s["frames_in"] == 13 and s["error"] == 0


def test_a_model_fused_with_itself_decides_as_it_does(models, wide_data, tmp_path):
    """The members' thresholds were set on border-evened maps: the fused map evens each member's border
    too, so a model fused with itself rejects the same good images and misses the same defects."""
    alone = _eval(models["memory_bank"], wide_data, tmp_path)
    out = tmp_path / "self"
    assert main(["fuse", str(models["memory_bank"]), str(models["memory_bank"]), "-o", str(out)]) == 0
    assert Model(models["memory_bank"]).maps.border  # there is a border to even
    fused = _eval(out, wide_data, tmp_path)
    assert fused["false_reject"] == alone["false_reject"] and fused["miss"] == alone["miss"]
    assert fused["image_auroc"] == pytest.approx(alone["image_auroc"])
    from pipeline.view import _model_info  # the live view describes it as it does any model

    assert _model_info(out)["*"]["normal_images"] == Model(models["memory_bank"]).thresholds["n_images"] > 0


def test_multi_class_model_reports_each_category_and_the_mean(tmp_path):
    a = make_dataset(tmp_path / "a" / "weave", n_train=10, n_good=3, n_defect=2, size=96, period=8.0, seed=1)
    b = make_dataset(tmp_path / "b" / "coarse", n_train=10, n_good=3, n_defect=2, size=96, period=24.0, seed=2)
    model = tmp_path / "both"
    assert main(["fit", str(a), str(b), "-o", str(model), "--kind", "reconstruction", "--input-size", "64",
                 "--epochs", "30"]) == 0
    assert json.loads((model / "manifest.json").read_text())["categories"] == ["weave", "coarse"]
    result = _eval(model, [a, b], tmp_path)
    assert set(result["categories"]) == {"weave", "coarse"}
    keys = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_iou_max",
            "pixel_aupro")
    for key in keys:
        assert result["mean"][key] == pytest.approx(np.mean([c[key] for c in result["categories"].values()]))
    assert all(c["image_auroc"] >= 0.8 for c in result["categories"].values())


def test_version_1_artifact_loads_as_version_2(fitted_model, synthetic_data, tmp_path):
    """A memory bank written by the previous release: square input, max image score."""
    from calibration.artifact import sha256

    old = tmp_path / "old"
    shutil.copytree(fitted_model, old)
    m = json.loads((old / "manifest.json").read_text())
    section = m["memory_bank"]
    v1 = {"format": "lineguard-model", "format_version": 1, "kind": "memory_bank",
          "embedding": {"backbone": "efficientnet_lite0", "layers": section["embedding"]["layers"], "input_size": 128,
                        "dim": 0, "seed": 0},
          "bank": section["bank"], "scoring": {"reweight_k": 0, "blur_sigma": 4.0}, "weights": None,
          "feature_dim": 152, "grid": [16, 16], "input": {"dtype": "uint8", "size": [128, 128]},
          "fit": {"data": m["fit"]["data"][0]},
          "files": {n: sha256(old / n) for n in ("model.onnx", "bank.faiss", "thresholds.json")}}
    (old / "manifest.json").write_text(json.dumps(v1))
    model = Model(old)
    assert model.manifest["upgraded_from"] == 1 and model.maps.image_score == "max"
    assert model.manifest["memory_bank"]["embedding"]["pool_padding"] == "exclude"
    assert (model.spec.height, model.spec.width) == (128, 128)
    assert _eval(old, synthetic_data, tmp_path)["image_auroc"] >= 0.9


def test_manifest_from_before_pool_padding_keeps_the_pooling_its_network_has(fitted_model, tmp_path):
    """A version-2 manifest written before --pool-padding existed: its graph averages border cells
    over the cells inside, whatever today's default."""
    old = tmp_path / "old"
    shutil.copytree(fitted_model, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["memory_bank"]["embedding"]["pool_padding"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert Model(old).manifest["memory_bank"]["embedding"]["pool_padding"] == "exclude"
    assert Model(fitted_model).manifest["memory_bank"]["embedding"]["pool_padding"] == EmbeddingConfig().pool_padding


@pytest.mark.parametrize("key, before, now", [("photometric", "none", "frame"), ("jpeg_decode", "full", "scaled")])
def test_manifest_from_before_a_geometry_option_keeps_what_its_model_was_fitted_on(fitted_model, tmp_path, key,
                                                                                  before, now):
    """A manifest written before --photometric (or --jpeg-decode) existed was fitted on unstandardised frames
    (JPEG frames decoded whole)."""
    old = tmp_path / "old"
    shutil.copytree(fitted_model, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["geometry"][key]
    (old / "manifest.json").write_text(json.dumps(m))
    assert getattr(Model(old).geometry, key) == before
    assert getattr(Model(fitted_model).geometry, key) == getattr(Geometry(), key) == now
    if key == "jpeg_decode":
        model = Model(old)
        assert model.geometer.decode_shrink(model.layout((1024, 1024))) == 1


def test_manifest_from_before_border_evening_uses_its_maps_as_they_come(fitted_model, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(fitted_model, old)
    m = json.loads((old / "manifest.json").read_text())
    assert len(m["maps"]["border"]) == m["maps"]["border_rings"] == 2  # fitted now
    del m["maps"]["border_rings"], m["maps"]["border"]
    (old / "manifest.json").write_text(json.dumps(m))
    maps = Model(old).maps
    assert maps.border_rings == 0 and maps.border == ()


def test_manifest_from_before_hnsw_storage_says_its_bank_holds_fp32(fitted_model, tmp_path):
    """The bank file holds its own storage; the manifest of an older model (an HNSW bank of fp32
    vectors, as older code built it, and no hnsw_storage) must not claim fp16, and it still serves."""
    import faiss

    from calibration.artifact import sha256
    from engines.banks import BankConfig, MemoryBank

    m = json.loads((fitted_model / "manifest.json").read_text())
    assert m["memory_bank"]["bank"]["hnsw_storage"] == "fp16"  # what a bank is built with now
    old = tmp_path / "old"
    shutil.copytree(fitted_model, old)
    index = faiss.read_index(str(fitted_model / "bank.faiss"))
    MemoryBank.build(index.reconstruct_n(0, index.ntotal), BankConfig(index="hnsw", hnsw_storage="fp32")).save(
        old / "bank.faiss")
    m["files"]["bank.faiss"] = sha256(old / "bank.faiss")
    m["memory_bank"]["bank"]["index"] = "hnsw"
    del m["memory_bank"]["bank"]["hnsw_storage"]
    (old / "manifest.json").write_text(json.dumps(m))
    model = Model(old)
    assert model.manifest["memory_bank"]["bank"]["hnsw_storage"] == "fp32"
    assert isinstance(faiss.read_index(str(old / "bank.faiss")), faiss.IndexHNSWFlat)
    size = model.manifest["input"]
    with model.detector(Deployment()) as detector:
        maps = detector.maps(np.zeros((1, size["height"], size["width"], 3), np.uint8))
    assert maps.shape[0] == 1 and np.isfinite(maps).all()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_user_errors_are_one_line_naming_the_fix(models, wide_data, synthetic_data, tmp_path, capsys):
    few = make_dataset(tmp_path / "few", n_train=5, n_good=1, n_defect=1, size=64)
    assert main(["fit", str(few), "-o", str(tmp_path / "r"), "--kind", "reconstruction"]) == 2
    line = _error_line(capsys)
    assert "at least 8" in line and "--shots" in line
    assert main(["fit", str(few), "-o", str(tmp_path / "s"), "--shots", "9"]) == 2
    assert "--shots 5 or fewer" in _error_line(capsys)
    assert main(["fit", str(few), "-o", str(tmp_path / "k"), "--kind", "autoencoder"]) == 2
    line = _error_line(capsys)
    assert "autoencoder" in line and "memory_bank" in line and "reconstruction" in line
    assert main(["fit", str(few), "-o", str(tmp_path / "o"), "--kind", "reconstruction", "--coreset-ratio", "0.2"]) == 2
    assert "--coreset-ratio applies to --kind memory_bank" in _error_line(capsys)
    assert main(["fit", str(few), "-o", str(tmp_path / "e"), "--kind", "ensemble"]) == 2
    assert "lineguard fuse" in _error_line(capsys)
    # fusing models of different inputs
    square = tmp_path / "square"
    assert main(["fit", str(synthetic_data), "-o", str(square), "--input-size", "64"]) == 0
    capsys.readouterr()
    assert main(["fuse", str(square), str(models["memory_bank"]), "-o", str(tmp_path / "f")]) == 2
    line = _error_line(capsys)
    assert "input" in line and "--input-size" in line
    assert main(["fuse", str(square), "-o", str(tmp_path / "g")]) == 2
    assert "at least two" in _error_line(capsys)
    # fusing models of different ROIs (each keeps its mask as roi.png), or tiled ones with an evened border
    for name, roi in (("left", "0,0,64,128"), ("right", "64,0,64,128")):
        assert main(["fit", str(synthetic_data), "-o", str(tmp_path / name), "--input-size", "64", "--roi", roi]) == 0
    capsys.readouterr()
    assert main(["fuse", str(tmp_path / "left"), str(tmp_path / "right"), "-o", str(tmp_path / "h")]) == 2
    assert "ROI files differ" in _error_line(capsys)
    tiled = tmp_path / "tiled"
    assert main(["fit", str(synthetic_data), "-o", str(tiled), "--input-size", "64", "--tiles", "--tile-scale", "1"]) == 0
    capsys.readouterr()
    assert main(["fuse", str(tiled), str(tiled), "-o", str(tmp_path / "i")]) == 2
    assert "--border-rings 0" in _error_line(capsys)
