"""The served networks (embedding, reconstruction), ONNX export, the Engine contract and the runtime registry
(engines/heads.py, export.py, runtimes.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engines.errors import ConfigError, InputError
from engines.export import export_onnx
from engines.heads import (EmbeddingConfig, FeatureReconstruction, PatchEmbedding, ReconstructionConfig,
                           reconstruction_distance)
from engines.runtimes import RUNTIMES, Deployment, OnnxRuntimeEngine, TorchEngine
from nets import rescale_convs

H, W = 64, 96  # a non-square input: part of the contract
CONFIG = EmbeddingConfig(layers=("stage2", "stage4"), dim=0)
# Runtimes agree with the torch module to this fraction of the largest |output| (ORT fuses conv+BN
# and reorders sums; the observed difference is ~1e-6 of the scale).
REL_ATOL = 1e-4


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def module():
    return rescale_convs(PatchEmbedding(CONFIG, H, W, weights="random"), seed=0)


@pytest.fixture(scope="module")
def reconstruction():
    config = ReconstructionConfig(encoder=EmbeddingConfig(layers=("stage2", "stage3", "stage4")), width=16,
                                  bottleneck=32)
    return rescale_convs(FeatureReconstruction(config, H, W, weights="random"), seed=1).eval()


@pytest.fixture(scope="module")
def onnx_path(module, tmp_path_factory):
    return export_onnx(module, H, W, tmp_path_factory.mktemp("onnx") / "embed.onnx", "embeddings")


@pytest.fixture(scope="module")
def networks(module, reconstruction, tmp_path_factory):
    """Both kinds of served network and their ONNX graphs: name -> (module, onnx path, output shape per image)."""
    folder = tmp_path_factory.mktemp("networks")
    rec = export_onnx(reconstruction, H, W, folder / "rec.onnx", "maps")
    return {"embedding": (module, export_onnx(module, H, W, folder / "emb.onnx", "embeddings"), (8, 12, 152)),
            "reconstruction": (reconstruction, rec, (8, 12))}


# ----------------------------------------------------------------------------- the head


def _local_mean_3x3(f: np.ndarray, pool_padding: str) -> np.ndarray:
    """[N, C, h, w] -> 3x3 neighbourhood mean; border windows divided by 9 (the zero padding included)
    or by the number of pixels that exist (excluded)."""
    n, c, h, w = f.shape
    padded = np.pad(f, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones((h, w)), 1)
    total = sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    count = sum(ones[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return total / (9.0 if pool_padding == "include" else count)


def _bilinear(f: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, C, h, w] -> [N, C, *size], half-pixel centres, edge clamped (align_corners=False)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, ly = axis(f.shape[2], size[0])
    x0, x1, lx = axis(f.shape[3], size[1])
    rows = f[:, :, y0] * (1 - ly)[:, None] + f[:, :, y1] * ly[:, None]
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx


def _expected_embedding(module: PatchEmbedding, images: np.ndarray) -> np.ndarray:
    x = (images.transpose(0, 3, 1, 2).astype(np.float32) - 127.0) / 128.0
    with torch.no_grad():
        feats = module.encoder.backbone(torch.from_numpy(x), module.config.layers)
    parts = []
    for name in module.config.layers:
        f = _local_mean_3x3(feats[name].numpy().astype(np.float64), module.config.pool_padding)
        if f.shape[-2:] != module.grid:
            f = _bilinear(f, module.grid)
        parts.append(f)
    cat = np.concatenate(parts, axis=1).transpose(0, 2, 3, 1)
    return cat @ module.projection.numpy().astype(np.float64)


def test_embedding_shape_dtype_and_grid(module):
    assert module.grid == (8, 12) and module.dim == 152 and module.stride == 8  # stage2: 40 ch; stage4: 112 ch
    with torch.no_grad():
        out = module(torch.from_numpy(_images(2)))
    assert out.shape == (2, 8, 12, 152)
    assert out.dtype == torch.float32


def test_embedding_matches_hand_computation(module):
    images = _images(2, seed=1)
    with torch.no_grad():
        got = module(torch.from_numpy(images)).numpy()
    want = _expected_embedding(module, images)
    scale = np.abs(want).max()
    assert scale > 1e-2  # features are not vanishing: the comparison means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("pool_padding", ["include", "exclude"])
def test_pool_padding_matches_hand_computation_and_only_changes_the_border(module, pool_padding):
    other = PatchEmbedding(dataclasses.replace(module.config, pool_padding=pool_padding), H, W, weights="random")
    other.encoder.backbone.load_state_dict(module.encoder.backbone.state_dict())
    images = _images(1, seed=6)
    with torch.no_grad():
        got, base = other(torch.from_numpy(images)).numpy(), module(torch.from_numpy(images)).numpy()
    want = _expected_embedding(other, images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # interior cells see no padding either way; the stride-16 stage's border cells, resized onto the
    # stride-8 grid, reach three cells in
    np.testing.assert_allclose(got[:, 3:-3, 3:-3], base[:, 3:-3, 3:-3], rtol=0, atol=1e-5 * np.abs(base).max())
    border_changed = not np.allclose(got[:, 0], base[:, 0], rtol=0, atol=1e-5 * np.abs(base).max())
    assert border_changed == (pool_padding != module.config.pool_padding)


def test_full_projection_is_per_stage_scaling(module):
    scales = np.concatenate([np.full(40, 40 ** -0.5), np.full(112, 112 ** -0.5)])
    np.testing.assert_allclose(module.projection.numpy(), np.diag(scales), rtol=1e-6, atol=0)


def test_unweighted_stages_are_plain_concatenation(module):
    plain = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), weighting="none", dim=0), H, W,
                           weights="random")
    plain.encoder.backbone.load_state_dict(module.encoder.backbone.state_dict())
    images = _images(1, seed=4)
    with torch.no_grad():
        a, b = plain(torch.from_numpy(images)).numpy(), module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(a[..., :40] * 40 ** -0.5, b[..., :40], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[..., 40:] * 112 ** -0.5, b[..., 40:], rtol=1e-5, atol=1e-6)


def test_context_mirrors_the_image_around_the_input(module):
    with_context = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), context=16, dim=0), H, W,
                                  weights="random")
    with_context.encoder.backbone.load_state_dict(module.encoder.backbone.state_dict())
    images = _images(1, seed=5)
    mirrored = np.pad(images, ((0, 0), (16, 16), (16, 16), (0, 0)), mode="reflect")
    bigger = PatchEmbedding(CONFIG, H + 32, W + 32, weights="random")
    bigger.encoder.backbone.load_state_dict(module.encoder.backbone.state_dict())
    with torch.no_grad():
        got = with_context(torch.from_numpy(images)).numpy()
        want = bigger(torch.from_numpy(mirrored)).numpy()[:, 2:-2, 2:-2]
    assert got.shape == (1, 8, 12, 152)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ConfigError, match="context"):
        PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), context=8), H, W, weights="random")


def test_random_projection_is_seeded_and_orthogonal():
    m = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), dim=32, projection="random"), H, W,
                       weights="random")
    assert m.dim == 32
    with torch.no_grad():
        out = m(torch.from_numpy(_images(1)))
    assert out.shape == (1, 8, 12, 32) and out.dtype == torch.float32
    # projection = diag(per-stage scale) @ Q with orthonormal Q [152, 32], fixed by the seed
    scales = np.concatenate([np.full(40, 40 ** -0.5), np.full(112, 112 ** -0.5)])
    q = m.projection.numpy() / scales[:, None]
    np.testing.assert_allclose(q.T @ q, np.eye(32), atol=1e-5)
    again = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), dim=32, projection="random"), H, W,
                           weights="random")
    assert torch.equal(again.projection, m.projection)
    other = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), dim=32, projection="random", seed=1), H, W,
                           weights="random")
    assert not torch.equal(other.projection, m.projection)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(weighting="sqrt"), "weighting"),
    (dict(context=-16), "context"),
    (dict(pool_padding="reflect"), "pool padding"),
    (dict(dim=-1), "dim"),
    (dict(layers=()), "layers"),
])
def test_embedding_config_validation(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        EmbeddingConfig(**kwargs)
    assert needle in str(err.value)


def test_embedding_config_accepts_list_layers():
    assert EmbeddingConfig(layers=["stage2", "stage3"]).layers == ("stage2", "stage3")


def test_embedding_unknown_layer_and_bad_input_size():
    with pytest.raises(ConfigError, match="stage7"):
        PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage7")), H, W, weights="random")
    with pytest.raises(ConfigError, match="multiple of"):
        PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4")), 72, 64, weights="random")


def test_reconstruction_map_is_the_feature_distance(reconstruction):
    images = torch.from_numpy(_images(2, seed=6))
    with torch.no_grad():
        maps = reconstruction(images)
        feats = reconstruction.encoder(images)
        recon = reconstruction.decoder(feats)
    assert maps.shape == (2, 8, 12) and maps.dtype == torch.float32
    want = sum(1 - torch.nn.functional.cosine_similarity(f, r, dim=1) for f, r in zip(feats, recon))
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-5)
    assert (maps >= 0).all() and (maps <= 6).all()
    # a perfect reconstruction scores 0 everywhere
    assert reconstruction_distance(feats, feats).abs().max() < 1e-5


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


def _make_engine(kind: str, module, onnx_path, tmp_path):
    if kind.startswith(("torch-cuda", "tensorrt")) and not _cuda():
        pytest.skip("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)")
    if kind == "tensorrt" and not _tensorrt():
        pytest.skip("needs tensorrt and pycuda (pip install 'lineguard[gpu]')")
    if kind == "torch":
        return TorchEngine(lambda: module, H, W)
    if kind == "onnxruntime":
        return OnnxRuntimeEngine(onnx_path, H, W)
    if kind == "torch-cuda":
        return TorchEngine(lambda: module, H, W, device="cuda")
    if kind == "torch-cuda-fp16-graphs":
        return TorchEngine(lambda: module, H, W, device="cuda", precision="fp16", cuda_graphs=True)
    from engines.tensorrt import TensorRTEngine, build_plan

    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    plan = build_plan(tmp_path / "model.onnx", tmp_path / "engines" / "engine.plan", H, W, "fp32", max_batch=4)
    return TensorRTEngine(plan, H, W, max_batch=4)


def test_every_runtime_is_covered():
    kinds = {p.values[0].split("-")[0] for p in ENGINES}
    assert set(RUNTIMES) <= kinds, f"runtimes without a conformance case: {set(RUNTIMES) - kinds}"


@pytest.mark.parametrize("network", ["embedding", "reconstruction"])
@pytest.mark.parametrize("kind, rel_atol", ENGINES)
def test_runtime_conformance(kind, rel_atol, network, networks, tmp_path):
    """Every runtime serves both kinds of network (embeddings, anomaly maps) like the torch module does."""
    module, path, shape = networks[network]
    images = _images(3, seed=2)
    with torch.no_grad():
        want = module(torch.from_numpy(images)).numpy()
    atol = rel_atol * np.abs(want).max()
    with _make_engine(kind, module, path, tmp_path) as engine:
        got = engine.infer(images)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == (3,) + shape
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
        one = engine.infer(images[1:2])  # the batch axis is dynamic
        assert one.shape == (1,) + shape
        np.testing.assert_allclose(one, want[1:2], rtol=0, atol=atol)
        # a non-contiguous view is accepted and gives the same result
        np.testing.assert_allclose(engine.infer(images[::-1]), want[::-1], rtol=0, atol=atol)


SHAPE = f"[N, {H}, {W}, 3]"
BAD_INPUTS = {
    "float": (np.zeros((2, H, W, 3), np.float32), "uint8"),
    "spatial": (np.zeros((2, 32, 32, 3), np.uint8), SHAPE),
    "transposed": (np.zeros((2, W, H, 3), np.uint8), SHAPE),
    "channels": (np.zeros((2, H, W, 4), np.uint8), SHAPE),
    "nchw": (np.zeros((2, 3, H, W), np.uint8), SHAPE),
    "3-D": (np.zeros((H, W, 3), np.uint8), SHAPE),
    "empty batch": (np.zeros((0, H, W, 3), np.uint8), SHAPE),
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
        assert engine.infer(_images(1)).shape == (1, 8, 12, 152)
    assert not engine.active
    with pytest.raises(RuntimeError):
        engine.infer(_images(1))
    # an exception inside the block still deactivates; activate() works again afterwards
    with pytest.raises(ValueError):
        with engine:
            raise ValueError("boom")
    assert not engine.active
    engine.activate()
    assert engine.active and engine.infer(_images(1)).shape == (1, 8, 12, 152)
    engine.deactivate()
    engine.deactivate()  # idempotent
    assert not engine.active


def test_torch_engine_builds_module_only_on_activation(module):
    calls = []

    def factory():
        calls.append(1)
        return module

    engine = TorchEngine(factory, H, W)
    assert calls == [] and engine.module is None
    engine.activate()
    engine.activate()  # a second activate does not rebuild
    assert calls == [1] and engine.module is module
    engine.deactivate()
    assert engine.module is None


def test_onnx_engine_touches_nothing_before_activation(tmp_path):
    engine = OnnxRuntimeEngine(tmp_path / "does_not_exist.onnx", H, W)  # constructing is free
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
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [H, W, 3]
    assert out.name == "embeddings" and out.type == "tensor(float)"


# ----------------------------------------------------------------------------- deployments


def test_deployment_json_round_trip_and_validation():
    d = Deployment(runtime="onnxruntime", precision="int8", threads=2)
    assert Deployment.from_json(d.to_json()) == d
    with pytest.raises(ConfigError, match="unknown field"):
        Deployment.from_json('{"runtime": "torch", "bank_precision": "fp16"}')
    with pytest.raises(ConfigError, match="not JSON"):
        Deployment.from_json("runtime=torch")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(runtime="openvino"), "unknown runtime"),
    (dict(precision="int8", runtime="torch"), "no precision 'int8'"),
    (dict(precision="fp16"), "no precision 'fp16'"),
    (dict(runtime="torch", precision="fp16"), "needs a GPU"),
    (dict(device="gpu"), "unknown device"),
    (dict(device="cuda"), "not 'cuda'"),
    (dict(runtime="torch", cuda_graphs=True), "CUDA graphs"),
    (dict(threads=0), "threads"),
])
def test_deployment_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Deployment(**kwargs)


def test_every_runtime_is_one_registry_entry():
    for name, entry in RUNTIMES.items():
        assert entry.name == name and entry.precisions and entry.devices and callable(entry.build)
        assert set(entry.compiled) <= set(entry.precisions)
    assert RUNTIMES["tensorrt"].extras == ("tensorrt", "pycuda")


def test_learned_projection_replaces_the_placeholder(module):
    """A "pca" embedding projects on its first `dim` channels until fit installs the principal axes."""
    pca = PatchEmbedding(EmbeddingConfig(layers=("stage2", "stage4"), dim=16), H, W, weights="random")
    pca.encoder.backbone.load_state_dict(module.encoder.backbone.state_dict())
    images = torch.from_numpy(_images(1, seed=7))
    with torch.no_grad():
        full = module(images).numpy()
        np.testing.assert_allclose(pca(images).numpy(), full[..., :16], rtol=1e-5, atol=1e-6)
        axes = torch.linalg.qr(torch.randn(152, 16, generator=torch.Generator().manual_seed(3)))[0]
        pca.set_projection(axes)
        np.testing.assert_allclose(pca(images).numpy(), full @ axes.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"\[152, 16\]"):
        pca.set_projection(torch.zeros(152, 8))
    assert EmbeddingConfig(dim=16).learned and not EmbeddingConfig(dim=16, projection="random").learned
    assert not EmbeddingConfig(dim=0).learned


def _cgroups(root, cgroup: str, files: dict[str, str]):
    """A fake /proc/self/cgroup and /sys/fs/cgroup tree under root."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("cgroup, files, cores", [
    # cgroup v2, the quota on a parent (a pod), none on the container itself: 1.5 CPUs -> 1
    ("0::/kubepods/pod1/ctr\n", {"kubepods/cpu.max": "150000 100000\n", "kubepods/pod1/ctr/cpu.max": "max 100000\n"}, 1),
    ("0::/ctr\n", {"ctr/cpu.max": "250000 100000\n"}, 2),  # docker --cpus 2.5
    ("0::/ctr\n", {"ctr/cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one thread
    ("0::/hidden/by/a/namespace\n", {"cpu.max": "200000 100000\n"}, 2),  # only the mount's root is visible
    ("0::/ctr\n", {"ctr/cpu.max": "max 100000\n"}, 64),  # no quota: the affinity mask
    # cgroup v1 (and a v2 line without a cpu controller, as on hybrid hosts)
    ("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 4),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 64),
    ("1:cpu:/\n", {}, 64),  # no cgroup files at all
])
def test_usable_cores_are_the_affinity_mask_bounded_by_the_cgroup_quota(tmp_path, monkeypatch, cgroup, files, cores):
    """A container given some CPUs of a 64-core host: os.cpu_count() says 64, the quota says otherwise."""
    from engines.runtimes import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cores(_cgroups(tmp_path, cgroup, files)) == cores


def test_usable_cores_follow_the_affinity_mask_below_the_quota(tmp_path, monkeypatch):
    from engines.runtimes import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 5, 9})  # taskset -c 0,5,9
    assert usable_cores(_cgroups(tmp_path, "0::/ctr\n", {"ctr/cpu.max": "800000 100000\n"})) == 3
    assert usable_cores(tmp_path / "nowhere") == 3
    assert 1 <= usable_cores() <= (len(__import__("os").sched_getaffinity(0)))  # this host


def test_an_unset_thread_count_is_every_usable_core_in_each_pool(onnx_path, tmp_path, monkeypatch):
    """threads None sizes ONNX Runtime's pool (and torch's, faiss's and BLAS's) by usable_cores, not by
    what each library counts on its own (the host's cores, inside a container)."""
    monkeypatch.setattr("engines.runtimes.usable_cores", lambda: 1)
    assert Deployment().cpu_threads == 1 and Deployment(threads=3).cpu_threads == 3
    (tmp_path / "model.onnx").write_bytes(onnx_path.read_bytes())
    for threads, pool in ((None, 1), (3, 3)):
        with Deployment(threads=threads).build(tmp_path, H, W, lambda: None) as engine:
            assert engine.session.get_session_options().intra_op_num_threads == pool


def test_the_reconstruction_distance_of_fp16_features_is_the_fp32_one():
    """A decoder served in fp16 (torch or TensorRT on a GPU): stages of 112 channels of features around 8
    have squared norms near 7000, whose product overflowed fp16 (65504) and read as a cosine of 0 (a
    distance of 1 in most cells). The distance is taken in float32."""
    import torch

    from engines.heads import reconstruction_distance

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 112, 8, 8, generator=g) * 8 for _ in range(2)]
    recon = [f + 0.1 * torch.randn(f.shape, generator=g) for f in feats]
    want = reconstruction_distance(feats, recon)
    got = reconstruction_distance([f.half() for f in feats], [r.half() for r in recon])
    assert got.dtype == torch.float32 and float(want.max()) < 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

