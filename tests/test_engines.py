"""PatchEmbedding head, ONNX export and the runtime Engine contract (engines/heads.py, export.py, runtimes.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.errors import ConfigError, InputError
from engines.export import export_onnx
from engines.heads import EmbeddingConfig, PatchEmbedding
from engines.runtimes import RUNTIMES, OnnxRuntimeEngine, TorchEngine
from nets import rescale_convs

SIZE = 64
CONFIG = EmbeddingConfig(layers=("stage2", "stage4"), input_size=SIZE, dim=0)
# Runtimes agree with the torch module to this fraction of the largest |feature| (ORT fuses conv+BN
# and reorders sums; the observed difference is ~1e-6 of the scale).
REL_ATOL = 1e-4


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def module():
    return rescale_convs(PatchEmbedding(CONFIG, weights="random"), seed=0)


@pytest.fixture(scope="module")
def onnx_path(module, tmp_path_factory):
    return export_onnx(module, SIZE, tmp_path_factory.mktemp("onnx") / "embed.onnx")


# ----------------------------------------------------------------------------- the head


def _local_mean_3x3(f: np.ndarray) -> np.ndarray:
    """[N, C, h, w] -> 3x3 neighbourhood mean, border windows averaged over the pixels that exist."""
    n, c, h, w = f.shape
    padded = np.pad(f, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones((h, w)), 1)
    total = sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    count = sum(ones[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return total / count


def _bilinear(f: np.ndarray, size: int) -> np.ndarray:
    """[N, C, h, w] -> [N, C, size, size], half-pixel centres, edge clamped (align_corners=False)."""
    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = axis(f.shape[2])
    x0, x1, lx = axis(f.shape[3])
    rows = f[:, :, y0] * (1 - ly)[:, None] + f[:, :, y1] * ly[:, None]
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx


def _expected_embedding(module: PatchEmbedding, images: np.ndarray) -> np.ndarray:
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) - 127.0) / 128.0
    with torch.no_grad():
        feats = module.backbone(torch.from_numpy(x), module.config.layers)
    parts = []
    for name in module.config.layers:
        f = _local_mean_3x3(feats[name].numpy().astype(np.float64))
        if f.shape[-1] != module.grid:
            f = _bilinear(f, module.grid)
        parts.append(f)
    cat = np.concatenate(parts, axis=1).transpose(0, 2, 3, 1)
    return cat @ module.projection.numpy().astype(np.float64)


def test_embedding_shape_dtype_and_grid(module):
    assert module.grid == 8 and module.dim == 152  # stage2: stride 8, 40 ch; stage4: 112 ch
    with torch.no_grad():
        out = module(torch.from_numpy(_images(2)))
    assert out.shape == (2, 8, 8, 152)
    assert out.dtype == torch.float32


def test_embedding_matches_hand_computation(module):
    images = _images(2, seed=1)
    with torch.no_grad():
        got = module(torch.from_numpy(images)).numpy()
    want = _expected_embedding(module, images)
    scale = np.abs(want).max()
    assert scale > 1e-2  # features are not vanishing: the comparison means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_full_projection_is_per_stage_scaling(module):
    scales = np.concatenate([np.full(40, 40 ** -0.5), np.full(112, 112 ** -0.5)])
    np.testing.assert_allclose(module.projection.numpy(), np.diag(scales), rtol=1e-6, atol=0)


def test_reduced_dim_projection():
    m = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), input_size=SIZE, dim=32), weights="random")
    assert m.dim == 32
    with torch.no_grad():
        out = m(torch.from_numpy(_images(1)))
    assert out.shape == (1, 8, 8, 32) and out.dtype == torch.float32
    # projection = diag(per-stage scale) @ Q with orthonormal Q [152, 32], fixed by the seed
    scales = np.concatenate([np.full(40, 40 ** -0.5), np.full(112, 112 ** -0.5)])
    q = m.projection.numpy() / scales[:, None]
    np.testing.assert_allclose(q.T @ q, np.eye(32), atol=1e-5)
    again = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), input_size=SIZE, dim=32), weights="random")
    assert torch.equal(again.projection, m.projection)
    other = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), input_size=SIZE, dim=32, seed=1),
                           weights="random")
    assert not torch.equal(other.projection, m.projection)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(input_size=100), "multiple of 32"),
    (dict(input_size=16), "multiple of 32"),
    (dict(input_size=0), "multiple of 32"),
    (dict(dim=-1), "dim"),
    (dict(layers=()), "layers"),
])
def test_embedding_config_validation(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        EmbeddingConfig(**kwargs)
    assert needle in str(err.value)


def test_embedding_config_accepts_list_layers():
    assert EmbeddingConfig(layers=["stage2", "stage3"]).layers == ("stage2", "stage3")


def test_embedding_unknown_layer():
    with pytest.raises(ConfigError, match="stage7"):
        PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage7"), input_size=SIZE), weights="random")


# ----------------------------------------------------------------------------- runtimes


def _cuda() -> bool:
    return torch.cuda.is_available()


def _tensorrt() -> bool:
    import importlib.util

    return _cuda() and all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda"))


# every runtime in RUNTIMES, and the GPU variants, each with its stated tolerance (a fraction of max |feature|)
ENGINES = [
    pytest.param("torch", 1e-4, id="torch-cpu"),
    pytest.param("onnxruntime", 1e-4, id="onnxruntime"),
    pytest.param("torch-cuda", 1e-3, id="torch-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("torch-cuda-fp16-graphs", 2e-2, id="torch-cuda-fp16-graphs", marks=pytest.mark.gpu),
    pytest.param("tensorrt", 1e-3, id="tensorrt-fp32", marks=pytest.mark.gpu),
]


def _make_engine(kind: str, module: PatchEmbedding, onnx_path, tmp_path):
    if kind.startswith(("torch-cuda", "tensorrt")) and not _cuda():
        pytest.skip("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    if kind == "tensorrt" and not _tensorrt():
        pytest.skip("needs tensorrt and pycuda (pip install 'lineguard[gpu]')")
    if kind == "torch":
        return TorchEngine(lambda: module, SIZE)
    if kind == "onnxruntime":
        return OnnxRuntimeEngine(onnx_path, SIZE)
    if kind == "torch-cuda":
        return TorchEngine(lambda: module, SIZE, device="cuda")
    if kind == "torch-cuda-fp16-graphs":
        return TorchEngine(lambda: module, SIZE, device="cuda", precision="fp16", cuda_graphs=True)
    from engines.tensorrt import TensorRTEngine, build_plan

    plan = build_plan(onnx_path, tmp_path / "engine.plan", SIZE, "fp32", max_batch=4)
    return TensorRTEngine(plan, SIZE, max_batch=4)


def test_every_runtime_is_covered():
    kinds = {p.values[0].split("-")[0] for p in ENGINES}
    assert set(RUNTIMES) <= kinds, f"runtimes without a conformance case: {set(RUNTIMES) - kinds}"


@pytest.mark.parametrize("kind, rel_atol", ENGINES)
def test_runtime_conformance(kind, rel_atol, module, onnx_path, tmp_path):
    images = _images(3, seed=2)
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    atol = rel_atol * np.abs(want).max()
    with _make_engine(kind, module, onnx_path, tmp_path) as engine:
        got = engine.infer(images)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == (3, 8, 8, 152)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        one = engine.infer(images[1:2])  # the batch axis is dynamic
        assert one.shape == (1, 8, 8, 152)
        np.testing.assert_allclose(one, want[1:2], rtol=0, atol=atol)
        # a non-contiguous view is accepted and gives the same result
        np.testing.assert_allclose(engine.infer(images[::-1]), want[::-1], rtol=0, atol=atol)


BAD_INPUTS = {
    "float": (np.zeros((2, SIZE, SIZE, 3), np.float32), "uint8"),
    "spatial": (np.zeros((2, 32, 32, 3), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "non-square": (np.zeros((2, SIZE, 2 * SIZE, 3), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "channels": (np.zeros((2, SIZE, SIZE, 4), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "nchw": (np.zeros((2, 3, SIZE, SIZE), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "3-D": (np.zeros((SIZE, SIZE, 3), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "empty batch": (np.zeros((0, SIZE, SIZE, 3), np.uint8), f"[N, {SIZE}, {SIZE}, 3]"),
    "list": ([[0]], "uint8"),
}


@pytest.mark.parametrize("kind, rel_atol", ENGINES)
def test_engine_rejects_bad_input(kind, rel_atol, module, onnx_path, tmp_path):
    with _make_engine(kind, module, onnx_path, tmp_path) as engine:
        for label, (bad, needle) in BAD_INPUTS.items():
            with pytest.raises(InputError) as err:
                engine.infer(bad)
            msg = str(err.value)
            assert needle in msg, (label, msg)
            if isinstance(bad, np.ndarray) and bad.dtype == np.uint8:
                assert str(list(bad.shape)) in msg, (label, msg)  # says what it got
            elif isinstance(bad, np.ndarray):
                assert "float32" in msg, (label, msg)


@pytest.mark.parametrize("kind, rel_atol", ENGINES)
def test_engine_lifecycle(kind, rel_atol, module, onnx_path, tmp_path):
    engine = _make_engine(kind, module, onnx_path, tmp_path)
    assert not engine.active
    with pytest.raises(RuntimeError, match="activate"):
        engine.infer(_images(1))
    with engine as active:
        assert active is engine and engine.active
        assert engine.infer(_images(1)).shape == (1, 8, 8, 152)
    assert not engine.active
    with pytest.raises(RuntimeError):
        engine.infer(_images(1))
    # an exception inside the block still deactivates; activate() works again afterwards
    with pytest.raises(ValueError):
        with engine:
            raise ValueError("boom")
    assert not engine.active
    engine.activate()
    assert engine.active and engine.infer(_images(1)).shape == (1, 8, 8, 152)
    engine.deactivate()
    engine.deactivate()  # idempotent
    assert not engine.active


def test_torch_engine_builds_module_only_on_activation(module):
    calls = []

    def factory():
        calls.append(1)
        return module

    engine = TorchEngine(factory, SIZE)
    assert calls == [] and engine.module is None
    engine.activate()
    engine.activate()  # a second activate does not rebuild
    assert calls == [1] and engine.module is module
    engine.deactivate()
    assert engine.module is None


def test_onnx_engine_touches_nothing_before_activation(tmp_path):
    engine = OnnxRuntimeEngine(tmp_path / "does_not_exist.onnx", SIZE)  # constructing is free
    assert engine.session is None and not engine.active
    with pytest.raises(Exception):
        engine.activate()
    assert not engine.active


def test_exported_graph_has_uint8_dynamic_batch_input(onnx_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [SIZE, SIZE, 3]
    assert out.name == "embeddings" and out.type == "tensor(float)"
