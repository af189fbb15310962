"""Compiled engines and deployments: INT8 export and parity on the CPU, deployment errors, the
exported graph's shape, and the GPU paths (marked gpu, skipped without an NVIDIA GPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from calibration.artifact import ArtifactError
from calibration.int8 import Int8Config, check_engine, engine_path, quantize_onnxruntime
from calibration.maps import smooth_map, smooth_maps_torch
from calibration.model import Deployment, InspectionModel
from engines.banks import MemoryBank
from engines.errors import ConfigError, MissingExtraError
from pipeline.cli import main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def int8_model(fitted_model, tmp_path_factory):
    model = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(fitted_model, model)
    record = quantize_onnxruntime(model, Int8Config(images=6))
    return model, record


def _images(model_dir, n=4):
    from calibration.dataset import iter_batches, train_images

    manifest = json.loads((model_dir / "manifest.json").read_text())
    paths = train_images(manifest["fit"]["data"])[:n]
    return next(iter_batches(paths, manifest["embedding"]["input_size"], n))[0]


def test_int8_export_writes_engine_and_settings(int8_model):
    model, record = int8_model
    path = engine_path(model, "onnxruntime", "int8")
    assert path.is_file() and json.loads(path.with_suffix(".json").read_text()) == record
    assert record["method"] == "minmax" and record["per_channel"] and len(record["calibration_images"]) == 6
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "QLinearConv" in ops
    # the uint8 image feeds the first QLinearConv directly (after the layout transpose): no float pass
    assert record["uint8_input"]
    first = [n for n in graph.node if "images" in n.input]
    assert [n.op_type for n in first] == ["Transpose"]
    users = [n for n in graph.node if first[0].output[0] in n.input]
    assert [n.op_type for n in users] == ["QLinearConv"]


def test_int8_features_and_scores_track_fp32(int8_model):
    model, _ = int8_model
    images = _images(model)
    with InspectionModel(model) as fp32, InspectionModel(model, Deployment(precision="int8")) as int8:
        f32, f8 = fp32.engine.infer(images), int8.engine.infer(images)
        assert f8.shape == f32.shape and f8.dtype == np.float32
        rel = np.abs(f8 - f32).mean() / np.abs(f32).mean()
        assert rel < 0.3, rel  # int8 of a whole network: coarse per element, close on average
        corr = np.corrcoef(f8.ravel(), f32.ravel())[0, 1]
        assert corr > 0.95, corr
        p32, _ = fp32.score(images)
        p8, _ = int8.score(images)
        assert np.corrcoef(p8.ravel(), p32.ravel())[0, 1] > 0.9


def test_int8_eval_still_finds_planted_defects(int8_model, synthetic_data, tmp_path):
    model, _ = int8_model
    out = tmp_path / "m.json"
    assert main(["eval", str(model), str(synthetic_data), "--precision", "int8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["precision"] == "int8"
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.85


def test_int8_engine_is_validated(int8_model, tmp_path):
    model, _ = int8_model
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    path = engine_path(copy, "onnxruntime", "int8")
    assert check_engine(copy, "onnxruntime", "int8") == path
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(ArtifactError, match="altered"):
        check_engine(copy, "onnxruntime", "int8")
    path.unlink()
    with pytest.raises(ArtifactError, match="lineguard export"):
        InspectionModel(copy, Deployment(precision="int8"))


def test_export_cli_and_missing_engine_message(fitted_model, synthetic_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    assert main(["eval", str(model), str(synthetic_data), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"lineguard export {model} --runtime onnxruntime --precision int8" in err[0]
    assert main(["export", str(model), "--precision", "int8", "--calib-images", "4",
                 "--calibration", "entropy", "--per-tensor"]) == 0
    record = json.loads(engine_path(model, "onnxruntime", "int8").with_suffix(".json").read_text())
    assert record["method"] == "entropy" and not record["per_channel"] and len(record["calibration_images"]) == 4


@pytest.mark.parametrize("args, needle", [
    (["--runtime", "torch", "--precision", "fp16"], "--device cuda"),
    (["--runtime", "onnxruntime", "--device", "cuda:0"], "onnxruntime runtime runs on the CPU"),
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


def test_torch_map_smoothing_matches_opencv():
    rng = np.random.default_rng(0)
    patch = rng.random((3, 16, 16)).astype(np.float32)
    want = np.stack([smooth_map(p, 128, 4.0) for p in patch])
    got = smooth_maps_torch(torch.from_numpy(patch), 128, 4.0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp16_bank_storage_on_cpu_is_close():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((500, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    from engines.banks import BankConfig

    exact = MemoryBank.build(bank)
    index = exact.index
    half = MemoryBank(index, BankConfig(), precision="fp16")
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
    cpu = MemoryBank.build(vectors)
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
    images = _images(fitted_model)
    with InspectionModel(fitted_model) as cpu:
        patch, scores = cpu.score(images)
        smoothed = np.stack([cpu.smooth(p) for p in patch])
    deployment = Deployment(runtime="torch", device="cuda", precision=precision, cuda_graphs=cuda_graphs)
    with InspectionModel(fitted_model, deployment) as gpu:
        maps, gpu_scores = gpu.score_on_device(images)
        assert maps.is_cuda
        np.testing.assert_allclose(gpu_scores.cpu().numpy(), scores, rtol=tol)
        np.testing.assert_allclose(maps.cpu().numpy(), smoothed, rtol=tol, atol=tol * smoothed.max())


@pytest.mark.gpu
@needs_cuda
def test_faiss_gpu_ivf_bank():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support (pip install 'lineguard[gpu]')")
    from engines.banks import BankConfig

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5000, 32)).astype(np.float32)
    cpu = MemoryBank.build(vectors, BankConfig(index="ivf", nprobe=16))
    gpu = MemoryBank(cpu.index, cpu.config, device="cuda")
    queries = rng.standard_normal((1000, 32)).astype(np.float32)
    d_cpu, _ = cpu.search(queries)
    d_gpu, _ = gpu.search(queries)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-3, atol=1e-3)


def test_cuda_without_a_gpu_is_refused_at_startup(fitted_model, synthetic_data, capsys):
    if CUDA:
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Deployment(runtime="torch", device="cuda")
    assert main(["eval", str(fitted_model), str(synthetic_data), "--runtime", "torch", "--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_ivf_on_gpu_without_faiss_gpu_names_the_extra():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss-gpu is installed with a GPU")
    from engines.banks import BankConfig

    vectors = np.random.default_rng(4).standard_normal((400, 8)).astype(np.float32)
    cpu = MemoryBank.build(vectors, BankConfig(index="ivf"))
    with pytest.raises(MissingExtraError, match=r"lineguard\[gpu\]"):
        MemoryBank(cpu.index, cpu.config, device="cuda")
