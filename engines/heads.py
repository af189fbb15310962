"""What sits on a backbone: the PatchCore patch-embedding head with preprocessing inside."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from engines.backbones import create_backbone
from engines.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """How patch embeddings are made; written into the model manifest.

    backbone: registered backbone name; layers: one or more stage names, the first one sets
    the grid (input_size / its stride); input_size: square side in pixels the network sees;
    dim: embedding size (0 keeps every channel; smaller values apply a fixed orthogonal
    projection seeded by `seed`).
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage2", "stage4")
    input_size: int = 256
    dim: int = 0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError("layers is empty; give at least one backbone stage, e.g. stage2,stage4")
        if self.input_size < 32 or self.input_size % 32:
            raise ConfigError(f"input_size {self.input_size} must be a multiple of 32, at least 32 (e.g. 256)")
        if self.dim < 0:
            raise ConfigError(f"dim {self.dim} must be 0 (keep all channels) or a positive size")


class PatchEmbedding(nn.Module):
    """uint8 images [N, S, S, 3] (NHWC, RGB, S = input_size) -> float32 embeddings [N, h, w, d].

    Per stage: 3x3 neighbourhood average (PatchCore's local aggregation), bilinear resize to
    the first stage's grid, scaled by 1/sqrt(channels) so every stage weighs the same in an
    L2 distance (what PatchCore's per-layer adaptive pooling to a common size achieves);
    stages are concatenated and, if `dim` asks for it, projected by a fixed orthogonal matrix.
    """

    def __init__(self, config: EmbeddingConfig, weights: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, weights)
        infos = [self.backbone.stage(name) for name in config.layers]
        self.grid = config.input_size // infos[0].stride
        norm = self.backbone.normalisation
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(norm.std).view(1, 3, 1, 1))
        scales = torch.cat([torch.full((i.channels,), i.channels**-0.5) for i in infos])
        channels = scales.numel()
        if config.dim and config.dim < channels:
            gen = torch.Generator().manual_seed(config.seed)
            q, _ = torch.linalg.qr(torch.randn(channels, config.dim, generator=gen))
            projection = scales[:, None] * q
        else:
            projection = torch.diag(scales)
        self.register_buffer("projection", projection)  # [C_total, d]
        self.register_buffer("scales", scales)  # [C_total]: the diagonal, applied as a cheaper product
        self.diagonal = projection.shape[0] == projection.shape[1]
        self.dim = projection.shape[1]
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) * self.inv_std
        feats = self.backbone(x, self.config.layers)
        parts = []
        for name in self.config.layers:
            f = F.avg_pool2d(feats[name], 3, 1, 1, count_include_pad=False)
            if f.shape[-1] != self.grid:
                f = F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            parts.append(f)
        x = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # [N, h, w, C_total]
        return x * self.scales if self.diagonal else x @ self.projection
