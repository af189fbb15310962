"""Compiled engines and deployments: INT8 export, its validation and its record, deployment errors, the
exported graph, and the GPU paths (marked gpu, skipped without an NVIDIA GPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from calibration.artifact import ArtifactError
from calibration.int8 import Int8Config, ValidationBar, cpu_recipe, quantize_onnxruntime, validate_int8
from calibration.maps import MapConfig, smooth, smooth_torch
from calibration.model import Inspector, Model
from engines.banks import BankConfig, MemoryBank
from engines.compiled import cpu_features, engine_file, engine_path
from engines.errors import ConfigError, MissingExtraError
from engines.runtimes import Deployment
from pipeline.cli import main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def int8_model(fitted_model, tmp_path_factory):
    model = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(fitted_model, model)
    (record,) = quantize_onnxruntime(model, config=Int8Config(images=6))
    return model, record


def _inputs(model_dir, n=4):
    from calibration.dataset import read_images, train_images

    model = Model(model_dir)
    images = list(read_images(train_images(model.manifest["fit"]["data"][0])[:n]))
    out = np.empty((n,) + model.spec.shape, np.uint8)
    for k, image in enumerate(images):
        model.geometer.prepare(image, model.layout(image.shape[:2]), out[k:k + 1])
    return out


def test_int8_export_writes_a_validated_engine_and_its_record(int8_model):
    model, record = int8_model
    path = engine_path(model, "onnxruntime", "int8")
    assert path.is_file() and json.loads(path.with_suffix(".json").read_text()) == record
    assert record["method"] == "minmax" and record["per_channel"] and len(record["calibration_images"]) == 6
    assert record["cpu_features"] == cpu_features()  # validated on this CPU, and it says so
    v = record["validation"]
    assert v["passed"] and v["map_correlation"] >= 0.95 and v["images"] == 2 * min(16, 12 - 6)
    assert (record["float_convs"], record["reduce_range"]) == cpu_recipe(cpu_features())
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("float_convs, reduce_range", [(0, False), (2, True)])
def test_int8_recipe_is_built_as_asked(fitted_model, tmp_path, float_convs, reduce_range):
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    config = Int8Config(images=4, float_convs=float_convs, reduce_range=reduce_range)
    (record,) = quantize_onnxruntime(model, config, bar=None)
    graph = onnx.load(str(engine_path(model, "onnxruntime", "int8"))).graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "QLinearConv") and n.name.startswith("/encoder/")]
    assert [n.op_type for n in convs[:float_convs]] == ["Conv"] * float_convs
    assert {n.op_type for n in convs[float_convs:]} == {"QLinearConv"}
    assert (record["float_convs"], record["reduce_range"]) == (float_convs, reduce_range)
    # per-channel symmetric weights reach 127 with 8 bits; 7 keep every pair sum of u8 x s8 below 2^15
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    largest = max(int(np.abs(inits[n.input[3]].astype(np.int32)).max()) for n in convs[float_convs:])
    assert largest == (64 if reduce_range else 127)
    first = [n for n in graph.node if "images" in n.input]
    assert [n.op_type for n in first] == ["Transpose"]
    users = [n.op_type for n in graph.node if first[0].output[0] in n.input]
    # a quantised stem reads the uint8 image itself (no float pass); a float stem takes the normalised image
    assert record["uint8_input"] == (float_convs == 0)
    assert users == (["QLinearConv"] if float_convs == 0 else ["Cast"])


def test_only_cpus_with_vnni_quantise_the_stem_with_8_bit_weights():
    assert cpu_recipe(["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"]) == (0, False)
    assert cpu_recipe(["avx2", "fma", "avx_vnni"]) == (0, False)
    assert cpu_recipe(["avx2", "fma"]) == (2, True)  # int16 pair sums: 7-bit weights, the stem float
    with pytest.raises(ConfigError, match="at least 0"):
        Int8Config(float_convs=-1)


def test_int8_maps_track_fp32(int8_model):
    model, _ = int8_model
    inputs = _inputs(model)
    with Model(model).detector(Deployment()) as fp32, Model(model).detector(Deployment(precision="int8")) as int8:
        f32, f8 = fp32.engine.infer(inputs), int8.engine.infer(inputs)
        assert f8.shape == f32.shape and f8.dtype == np.float32
        assert np.corrcoef(f8.ravel(), f32.ravel())[0, 1] > 0.95, "features"
        m32, m8 = fp32.maps(inputs), int8.maps(inputs)
        # raw maps of normal images (little signal): held to the floor the export's validation holds them to
        assert np.corrcoef(m8.ravel(), m32.ravel())[0, 1] >= ValidationBar().map_correlation, "anomaly maps"


def test_int8_eval_still_finds_planted_defects(int8_model, synthetic_data, tmp_path):
    model, _ = int8_model
    out = tmp_path / "m.json"
    assert main(["eval", str(model), str(synthetic_data), "--precision", "int8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["deployment"]["precision"] == "int8"
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.85


def test_int8_that_fails_validation_is_refused_and_removed(fitted_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    impossible = ValidationBar(map_correlation=1.01)  # no int8 engine can meet it
    with pytest.raises(ConfigError, match="fails validation") as err:
        quantize_onnxruntime(model, Int8Config(images=4), bar=impossible)
    assert "map correlation" in str(err.value) and "--precision fp32" in str(err.value)
    assert not engine_path(model, "onnxruntime", "int8").exists()  # nothing half-valid left to serve
    with pytest.raises(ArtifactError, match="lineguard export"):
        Model(model).detector(Deployment(precision="int8"))


def test_int8_export_interrupted_while_validating_leaves_no_engine(fitted_model, tmp_path, monkeypatch):
    """Ctrl-C during the (long) validation: the engine written for it is removed, so no engine that was
    never validated is served."""
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("calibration.int8.validate_int8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_onnxruntime(model, Int8Config(images=4))
    assert not engine_path(model, "onnxruntime", "int8").exists()
    assert not engine_path(model, "onnxruntime", "int8").with_suffix(".json").exists()


def test_validation_measures_int8_against_fp32(int8_model):
    model, _ = int8_model
    v = validate_int8(model, ValidationBar(images=4))
    assert v["passed"] and v["images"] == 8
    fp32_image, int8_image = v["image_auroc"]
    assert 0.5 <= int8_image <= 1 and abs(fp32_image - int8_image) <= 0.01


def test_int8_engine_is_checked_against_its_model_and_cpu(int8_model, tmp_path):
    model, _ = int8_model
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    path = engine_path(copy, "onnxruntime", "int8")
    d = Deployment(precision="int8")
    assert engine_file(copy, d) == path
    record = json.loads(path.with_suffix(".json").read_text())
    # an engine validated on a CPU with other instruction sets is refused until validated here
    foreign = {**record, "cpu_features": ["avx2", "fma"] if "avx512f" in cpu_features() else ["avx512_vnni"]}
    path.with_suffix(".json").write_text(json.dumps(foreign))
    with pytest.raises(ArtifactError, match="validate it here") as err:
        engine_file(copy, d)
    assert f"lineguard export {copy} --runtime onnxruntime --precision int8" in str(err.value)
    path.with_suffix(".json").write_text(json.dumps(record))
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(ArtifactError, match="altered"):
        engine_file(copy, d)
    path.unlink()
    with pytest.raises(ArtifactError, match="lineguard export"):
        Model(copy).detector(d)


def test_export_cli_and_missing_engine_message(fitted_model, synthetic_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    assert main(["eval", str(model), str(synthetic_data), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"lineguard export {model} --runtime onnxruntime --precision int8" in err[0]
    quantize_onnxruntime(model, config=Int8Config("entropy", False, 4))  # what the command below runs
    assert main(["export", str(model), "--precision", "int8", "--calib-images", "4",
                 "--calibration", "entropy", "--per-tensor"]) == 0
    assert "validated on" in capsys.readouterr().out
    record = json.loads(engine_path(model, "onnxruntime", "int8").with_suffix(".json").read_text())
    assert record["method"] == "entropy" and not record["per_channel"] and len(record["calibration_images"]) == 4


@pytest.mark.parametrize("args, needle", [
    (["--runtime", "torch", "--precision", "fp16"], "needs a GPU"),
    (["--runtime", "onnxruntime", "--device", "cuda:0"], "runs on cpu"),
    (["--runtime", "onnxruntime", "--precision", "fp16"], "no precision 'fp16'"),
    (["--device", "tpu"], "unknown device"),
])
def test_deployment_errors_are_one_line(fitted_model, synthetic_data, capsys, args, needle):
    assert main(["eval", str(fitted_model), str(synthetic_data), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.skipif(CUDA and __import__("importlib").util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here: the missing-runtime message cannot be shown")
def test_missing_tensorrt_names_the_extra(fitted_model, synthetic_data, capsys):
    with pytest.raises(MissingExtraError, match=r"lineguard\[gpu\]"):
        Deployment(runtime="tensorrt", device="cuda")
    assert main(["run", str(fitted_model), "--runtime", "tensorrt", "--device", "cuda", "--frames", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lineguard[gpu]'" in err[0]


def test_exported_graph_has_no_pad_nodes(fitted_model):
    ops = [n.op_type for n in onnx.load(str(fitted_model / "model.onnx")).graph.node]
    assert "Pad" not in ops and "Conv" in ops


@pytest.mark.parametrize("shape, sigma", [((16, 16), 4.0), ((8, 12), 2.0), ((6, 10), 0.0)])
def test_torch_map_smoothing_matches_opencv(shape, sigma):
    rng = np.random.default_rng(0)
    grid = rng.random((3,) + shape).astype(np.float32)
    config = MapConfig(blur_sigma=sigma)
    want = np.stack([smooth(g, config) for g in grid])
    got = smooth_torch(torch.from_numpy(grid), config).numpy()
    assert got.shape == (3, shape[0] * 8, shape[1] * 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp16_bank_storage_on_cpu_is_close():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((500, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)

    exact = MemoryBank.build(bank, BankConfig(index="flat"))
    half = MemoryBank(exact.index, BankConfig(index="flat"), precision="fp16")
    d32, i32 = exact.search(queries)
    d16, i16 = half.search(queries)
    assert (i16 == i32).mean() > 0.95
    np.testing.assert_allclose(d16, d32, rtol=2e-3)


# ----------------------------------------------------------------------------- GPU (skipped without one)


@pytest.mark.gpu
@needs_cuda
def test_gpu_bank_equals_cpu_bank():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    queries = rng.standard_normal((4096, 64)).astype(np.float32)
    cpu = MemoryBank.build(vectors, BankConfig(index="flat"))
    gpu = MemoryBank(cpu.index, cpu.config, device="cuda")
    d_cpu, i_cpu = cpu.search(queries)
    d_gpu, i_gpu = gpu.search_tensor(torch.from_numpy(queries).cuda())
    assert d_gpu.is_cuda
    np.testing.assert_allclose(d_gpu.cpu().numpy(), d_cpu, rtol=1e-4, atol=1e-4)
    assert (i_gpu.cpu().numpy() == i_cpu).mean() > 0.999


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision, cuda_graphs, tol", [("fp32", False, 1e-3), ("fp16", True, 3e-2)])
def test_whole_gpu_path_matches_cpu(fitted_model, precision, cuda_graphs, tol):
    model = Model(fitted_model)
    inputs = _inputs(fitted_model)
    with model.detector(Deployment()) as cpu:
        maps = cpu.maps(inputs)
    deployment = Deployment(runtime="torch", device="cuda", precision=precision, cuda_graphs=cuda_graphs)
    with model.detector(deployment) as gpu:
        device_maps = gpu.maps_device(inputs)
        assert device_maps.is_cuda
        np.testing.assert_allclose(device_maps.cpu().numpy(), maps, rtol=tol, atol=tol * maps.max())
        smoothed = smooth_torch(device_maps, model.maps)
        assert smoothed.is_cuda
        want = np.stack([smooth(m, model.maps) for m in maps])
        np.testing.assert_allclose(smoothed.cpu().numpy(), want, rtol=tol, atol=tol * want.max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_bank_on_a_gpu_is_searched_exactly(kind):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5000, 32)).astype(np.float32)
    cpu = MemoryBank.build(vectors, BankConfig(index=kind))
    gpu = MemoryBank(cpu.index, cpu.config, device="cuda")
    assert gpu.exact and gpu.torch_search
    queries = rng.standard_normal((1000, 32)).astype(np.float32)
    d_gpu, _ = gpu.search(queries)
    np.testing.assert_allclose(d_gpu, cpu.search_exact(queries)[0], rtol=1e-4, atol=1e-4)


def test_cuda_without_a_gpu_is_refused_at_startup(fitted_model, synthetic_data, capsys):
    if CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Deployment(runtime="torch", device="cuda")
    assert main(["eval", str(fitted_model), str(synthetic_data), "--runtime", "torch", "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def _box_iou(a, b) -> float:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / (aw * ah + bw * bh - iw * ih)


def test_device_path_computes_what_the_host_path_does(fitted_model, synthetic_data):
    """The GPU path's logic (scores, verdicts, smoothing and normalisation on the device, 8-bit heat of
    defective frames only) run on a torch CPU device, against the host path."""
    from calibration.dataset import evaluation_samples, read_images

    model = Model(fitted_model)
    assert model.maps.border  # the border evening runs on both paths
    frames = list(read_images([s.path for s in evaluation_samples(synthetic_data)]))
    with Inspector(model, Deployment()) as host, Inspector(model, Deployment("torch"), device_path=True) as device:
        want, got = host.inspect(frames), device.inspect(frames)
    defects = 0
    for w, g in zip(want, got):
        assert g.score == pytest.approx(w.score, rel=1e-4, abs=1e-5)
        dw = model.decide(w.canvas_map, w.layout.frame, w.score)
        dg = model.decide(g.canvas_map, g.layout.frame, g.score, g.heat)
        assert dg.verdict == dw.verdict
        if dw.verdict == "defect":
            defects += 1
            assert g.heat is not None and g.heat.dtype == np.uint8 and g.heat.shape == dw.heat.shape
            assert np.abs(g.heat.astype(int) - (dw.heat * 255).astype(int)).max() <= 1
            # the same defect pixels, up to the 8-bit rounding of values at the threshold
            mask_g, mask_w = g.heat >= 128, dw.heat >= 0.5
            assert (mask_g & mask_w).sum() >= 0.95 * (mask_g | mask_w).sum()
            assert _box_iou(dg.regions[0][0], dw.regions[0][0]) >= 0.9  # and the same main region
        else:
            assert g.heat is None  # ok frames bring back no map
    assert defects >= 5


ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c

processor\t: 1
Features\t: fp asimd
CPU part\t: 0xd0c
"""


def test_an_arm_cpu_is_named_by_its_core_and_its_int8_features(tmp_path):
    """Arm kernels name no model and list "Features", not "flags": a Neoverse N1 (part 0xd0c, dot product)
    differs from a core without the dot product, so int8 engines and bank index timings are not carried over."""
    from engines.compiled import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text(ARM_CPUINFO)
    assert "implementer 0x41 part 0xd0c" in cpu_model(info)
    assert "asimddp" in cpu_features(info) and "i8mm" not in cpu_features(info)
    info.write_text(ARM_CPUINFO.replace(" asimddp", ""))
    assert "asimddp" not in cpu_features(info)
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 amx_int8\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor" and "amx_int8" in cpu_features(info)
    assert cpu_model(tmp_path / "none")  # no /proc: what the platform says
