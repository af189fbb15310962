"""What sits on a backbone: the networks that are exported and served, preprocessing inside.

- `PatchEmbedding` (memory-bank kind): uint8 images -> patch embeddings [N, h, w, d];
- `FeatureReconstruction` (reconstruction kind): uint8 images -> anomaly maps [N, h, w], the
  per-position distance between the frozen encoder's features and their reconstruction from a
  bottleneck (reverse distillation, Deng & Li 2022, with a small decoder).

Both start with `Encoder`: NHWC uint8 -> the backbone's normalisation -> named stages -> PatchCore's
3x3 local averaging, every stage resized to the first stage's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import create_backbone
from engines.errors import ConfigError
from engines.head_config import EmbeddingConfig, ReconstructionConfig


class Encoder(nn.Module):
    """uint8 [N, H, W, 3] -> {stage: float32 [N, C, H/s0, W/s0]}: normalised, 3x3-averaged stage features
    on the first stage's grid (s0 its stride), `context` mirrored pixels cropped away."""

    def __init__(self, config: EmbeddingConfig, height: int, width: int, weights: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, weights)
        self.infos = [self.backbone.stage(name) for name in config.layers]
        self.stride = self.infos[0].stride
        deepest = max(i.stride for i in self.infos)
        if height % deepest or width % deepest:
            raise ConfigError(f"input {height}x{width} must be a multiple of the deepest stage's stride {deepest}")
        if config.context % deepest:
            raise ConfigError(f"context {config.context} must be a multiple of the deepest stage's stride {deepest}")
        self.grid = (height // self.stride, width // self.stride)
        self.crop = config.context // self.stride
        norm = self.backbone.normalisation
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(norm.std).view(1, 3, 1, 1))

    @property
    def channels(self) -> list[int]:
        return [i.channels for i in self.infos]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) * self.inv_std
        c = self.config.context
        if c:
            x = F.pad(x, (c, c, c, c), mode="reflect")
        feats = self.backbone(x, self.config.layers)
        grid = (self.grid[0] + 2 * self.crop, self.grid[1] + 2 * self.crop)
        out = []
        for name in self.config.layers:
            f = F.avg_pool2d(feats[name], 3, 1, 1, count_include_pad=self.config.pool_padding == "include")
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            if self.crop:
                f = f[:, :, self.crop:grid[0] - self.crop, self.crop:grid[1] - self.crop]
            out.append(f)
        return out


class PatchEmbedding(nn.Module):
    """uint8 images [N, H, W, 3] (NHWC, RGB) -> float32 embeddings [N, H/s, W/s, d] (s: the first stage's stride).

    Stages from `Encoder`, weighted (config.weighting), concatenated and, if `dim` asks for it,
    projected: by a fixed orthogonal matrix, or by the learned one `set_projection` installs (until
    then, a "pca" embedding projects on its first `dim` channels).
    """

    def __init__(self, config: EmbeddingConfig, height: int, width: int, weights: str | None = None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, height, width, weights)
        self.grid, self.stride = self.encoder.grid, self.encoder.stride
        if config.weighting == "equal":
            scales = torch.cat([torch.full((c,), c**-0.5) for c in self.encoder.channels])
        else:
            scales = torch.ones(sum(self.encoder.channels))
        channels = scales.numel()
        self.register_buffer("scales", scales)  # [C_total]: the diagonal, applied as a cheaper product
        if config.dim and config.dim < channels:
            if config.projection == "random":
                gen = torch.Generator().manual_seed(config.seed)
                matrix, _ = torch.linalg.qr(torch.randn(channels, config.dim, generator=gen))
            else:
                matrix = torch.eye(channels)[:, :config.dim]
            self.register_buffer("projection", scales[:, None] * matrix)  # [C_total, d]
        else:
            self.register_buffer("projection", torch.diag(scales))
        self.diagonal = self.projection.shape[0] == self.projection.shape[1]
        self.dim = self.projection.shape[1]
        self.eval()

    @property
    def channels(self) -> int:
        return self.scales.numel()

    def set_projection(self, matrix: torch.Tensor) -> None:
        """Project the weighted features with float32 `matrix` [C_total, d] (e.g. principal axes)."""
        if matrix.shape != (self.channels, self.dim):
            raise ConfigError(f"projection of shape {tuple(matrix.shape)}; this embedding needs "
                              f"[{self.channels}, {self.dim}]")
        self.projection = self.scales[:, None] * matrix.to(torch.float32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.cat(self.encoder(images), dim=1).permute(0, 2, 3, 1)  # [N, h, w, C_total]
        return x * self.scales if self.diagonal else x @ self.projection


# ----------------------------------------------------------------------------- reconstruction


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """Encoder features [N, C_k, h, w] (all on one grid) -> their reconstructions, through a bottleneck
    at a quarter of the grid's resolution (h/4, w/4): the decoder cannot copy its input, so what it
    has never seen (defects) comes back wrong."""

    def __init__(self, channels: list[int], width: int, bottleneck: int):
        super().__init__()
        total = sum(channels)
        self.squeeze = nn.Sequential(nn.Conv2d(total, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        self.down = nn.Sequential(_conv(width, width, 2), _conv(width, bottleneck, 2), _conv(bottleneck, bottleneck))
        self.up1 = _conv(bottleneck, width)
        self.up2 = _conv(width, width)
        self.out = nn.Conv2d(width, total, 1)
        self.channels = list(channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat(feats, dim=1)
        h, w = x.shape[-2:]
        z = self.down(self.squeeze(x))
        y = self.up1(F.interpolate(z, size=(h // 2, w // 2), mode="bilinear", align_corners=False))
        y = self.up2(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return list(torch.split(self.out(y), self.channels, dim=1))


def reconstruction_distance(feats: list[torch.Tensor], recon: list[torch.Tensor]) -> torch.Tensor:
    """Per-position anomaly: sum over stages of (1 - cosine similarity): float32 [N, h, w], in [0, 2 * stages].
    In float32 whatever the network ran in: a stage's squared norms reach 1e4, and their product
    overflowed fp16 (65504) in most cells, where the cosine then read 0."""
    total = 0.0
    for f, r in zip(feats, recon):
        f, r = f.float(), r.float()
        dot = (f * r).sum(1)
        norms = (f.square().sum(1) * r.square().sum(1)).clamp_min(1e-16).sqrt()
        total = total + (1.0 - dot / norms)
    return total


class FeatureReconstruction(nn.Module):
    """uint8 images [N, H, W, 3] -> float32 anomaly maps [N, H/s, W/s]: one graph, no bank."""

    def __init__(self, config: ReconstructionConfig, height: int, width: int, weights: str | None = None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, height, width, weights)
        self.grid, self.stride = self.encoder.grid, self.encoder.stride
        if self.grid[0] % 4 or self.grid[1] % 4:
            raise ConfigError(f"input {height}x{width} must give a grid divisible by 4 (multiples of {4 * self.stride})")
        self.decoder = Decoder(self.encoder.channels, config.width, config.bottleneck)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(images)
        return reconstruction_distance(feats, self.decoder(feats))
