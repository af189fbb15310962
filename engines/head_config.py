"""What the served networks (engines/heads.py) are built from: their configs, written into the model
manifest, and the choices they take. No torch here: reading a manifest (the sink, the postprocess
worker, the supervisor) must not pay torch's import."""

from __future__ import annotations

import dataclasses

from engines.errors import ConfigError

WEIGHTINGS = ("equal", "none")
POOL_PADDINGS = ("include", "exclude")
PROJECTIONS = ("pca", "random")


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """How patch features are made; written into the model manifest.

    backbone: registered backbone name; layers: one or more stage names, the first one sets the
    grid (input / its stride); weighting: "equal" scales each stage by 1/sqrt(channels) so every
    stage weighs the same in an L2 distance, "none" concatenates them as they come; context: pixels
    of the image mirrored around each input before the network and cropped from its features
    (a multiple of the deepest stride), so border patches see image instead of zero padding;
    pool_padding: PatchCore's 3x3 local average at the border, "include" counting the zero padding
    (border patches damped, as the published PatchCore and anomalib) or "exclude" averaging only the
    cells inside; dim: embedding size (0 keeps every channel); projection: how `dim` is reached, "pca" (the
    principal axes of the training patches, learned by fit and stored with the model) or "random"
    (a fixed orthogonal matrix seeded by `seed`).
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage2", "stage4")
    weighting: str = "equal"
    context: int = 0
    pool_padding: str = "exclude"
    dim: int = 64
    projection: str = "pca"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError("layers is empty; give at least one backbone stage, e.g. stage2,stage4")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown stage weighting {self.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if self.dim < 0 or self.context < 0:
            raise ConfigError(f"dim {self.dim} and context {self.context} must be >= 0")
        if self.pool_padding not in POOL_PADDINGS:
            raise ConfigError(f"unknown pool padding {self.pool_padding!r}; valid: {', '.join(POOL_PADDINGS)}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"unknown projection {self.projection!r}; valid: {', '.join(PROJECTIONS)}")

    @property
    def learned(self) -> bool:
        """Whether fit learns the projection from the training patches (stored as projection.npy)."""
        return bool(self.dim) and self.projection == "pca"


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """The decoder of the reconstruction kind; written into the manifest.

    encoder: the frozen feature extractor (its `weighting` and `dim` are not used); width:
    channels of the decoder; bottleneck: channels of the embedding at twice the deepest stride.
    """

    encoder: EmbeddingConfig = EmbeddingConfig(layers=("stage2", "stage3", "stage4"))
    width: int = 64
    bottleneck: int = 128

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EmbeddingConfig(**self.encoder))
        if len(self.encoder.layers) < 2:
            raise ConfigError("the reconstruction encoder needs at least two stages, e.g. stage2,stage3,stage4")
        if self.width < 8 or self.bottleneck < 8:
            raise ConfigError(f"decoder width {self.width} and bottleneck {self.bottleneck} must be at least 8")
