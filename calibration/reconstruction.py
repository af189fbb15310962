"""The reconstruction kind: a trained decoder reconstructs the frozen encoder's features from a bottleneck.

Fit: a share of each dataset's training images is held out for calibration; the encoder's
features of the rest are computed once and cached (float16); the decoder trains on that cache
(AdamW, linear warm-up then cosine decay, seeded batch order: deterministic for a given
`--steps` and thread count); `--max-minutes` bounds the training, the step count is then set
from the measured time of the first steps. Augmentation: none by default; "flips" flips the
cached feature maps (not the images: one encoder pass serves every epoch). The whole path image ->
anomaly map (encoder, decoder, 1 - cosine per stage) is exported as ONE graph, `model.onnx`, so
every runtime serves it as it serves the backbone; its cost does not depend on the training set.
Calibration: the held-out images through the served engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.kinds import Detector, Kind
from engines.errors import ConfigError
from engines.head_config import ReconstructionConfig
from engines.runtimes import Deployment, TorchEngine

if TYPE_CHECKING:
    from engines.heads import FeatureReconstruction

MIN_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class ReconstructionOptions:
    """network: encoder stages and decoder size; steps: training steps (0: `epochs` passes over the
    cached features); batch: feature maps per step; lr: peak learning rate; max_minutes: bound on the
    training time; holdout: share of each dataset's images kept out of training for calibration;
    augment: "none" or "flips" (of the cached feature maps)."""

    network: ReconstructionConfig = ReconstructionConfig()
    steps: int = 0
    epochs: float = 36.0  # measured: bench/results/levers.json, rows rec-epochs-*
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_minutes: float = 4.0
    holdout: float = 0.1
    augment: str = "none"

    def __post_init__(self):
        if isinstance(self.network, dict):
            object.__setattr__(self, "network", ReconstructionConfig(**self.network))
        if self.steps < 0 or self.epochs <= 0 or self.batch < 1 or self.lr <= 0 or self.max_minutes <= 0:
            raise ConfigError("steps must be >= 0; epochs, batch, lr and max minutes > 0")
        if not 0.0 < self.holdout < 0.5:
            raise ConfigError(f"holdout {self.holdout} must be in (0, 0.5), e.g. 0.1")
        if self.augment not in ("none", "flips"):
            raise ConfigError(f"unknown augmentation {self.augment!r}; valid: none, flips")

    FLAGS = ("backbone", "layers", "steps", "epochs", "lr", "max_minutes", "holdout", "decoder_width", "flip_features")

    @classmethod
    def from_flags(cls, flags: dict, seed: int = 0) -> "ReconstructionOptions":
        """Options from command-line values (FLAGS names), defaults for the rest."""
        base = cls()
        encoder = dataclasses.replace(base.network.encoder, **{k: flags[k] for k in ("backbone", "layers") if k in flags})
        network = dataclasses.replace(base.network, encoder=encoder)
        if "decoder_width" in flags:
            network = dataclasses.replace(network, width=flags["decoder_width"], bottleneck=2 * flags["decoder_width"])
        own = {k: flags[k] for k in ("steps", "epochs", "lr", "max_minutes", "holdout") if k in flags}
        if flags.get("flip_features"):
            own["augment"] = "flips"
        return cls(network=network, **own)


def network(model_dir: Path, manifest: dict) -> "FeatureReconstruction":
    import torch

    from engines.heads import FeatureReconstruction

    section = manifest["reconstruction"]
    module = FeatureReconstruction(ReconstructionConfig(**section["network"]), manifest["input"]["height"],
                                   manifest["input"]["width"], manifest.get("weights"))
    state = torch.load(Path(model_dir) / "decoder.pt", map_location="cpu", weights_only=True)
    module.decoder.load_state_dict(state)
    return module.eval()


class ReconstructionDetector(Detector):
    """The engine's output is the anomaly map itself."""

    def __init__(self, model_dir: Path, manifest: dict, deployment: Deployment):
        h, w = manifest["input"]["height"], manifest["input"]["width"]
        super().__init__(deployment.build(model_dir, h, w, lambda: network(model_dir, manifest)))

    def maps(self, inputs: np.ndarray) -> np.ndarray:
        return self.engine.infer(inputs)

    def maps_device(self, inputs: np.ndarray):
        return self.engine.infer_device(inputs)


def split(categories: list[int], holdout: float, seed: int) -> np.ndarray:
    """bool [n]: True for images held out of training: `holdout` of each category, at least min(4, a third) of it."""
    categories = np.asarray(categories)
    held = np.zeros(len(categories), bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(categories):
        idx = np.flatnonzero(categories == c)
        k = max(1, int(round(holdout * len(idx))), min(4, len(idx) // 3))
        held[rng.choice(idx, size=k, replace=False)] = True
    return held


class _EncoderFeatures:
    """A module factory: images -> concatenated encoder stages float32 [N, C, h, w] (for the cache)."""

    def __init__(self, module: "FeatureReconstruction"):
        self.module = module

    def __call__(self):
        import torch

        encoder = self.module.encoder

        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder

            def forward(self, x):
                return torch.cat(self.encoder(x), dim=1)

        return Features()


def fit(ctx):
    import torch

    from calibration.fit import FitOutput
    from engines.heads import FeatureReconstruction

    o: ReconstructionOptions = ctx.options
    if len(ctx.paths) < MIN_IMAGES:
        raise ConfigError(f"a reconstruction model needs at least {MIN_IMAGES} normal training images, the data has "
                          f"{len(ctx.paths)}; add images, or use --kind memory_bank (--shots K for a few images)")
    spec = ctx.spec
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    module = FeatureReconstruction(o.network, spec.height, spec.width, ctx.weights)
    if ctx.maps.stride != module.stride:
        raise ConfigError(f"map stride {ctx.maps.stride} differs from the encoder's {module.stride}")
    held = split(ctx.categories, o.holdout, ctx.seed)
    train_paths = [p for p, h in zip(ctx.paths, held) if not h]
    held_paths = [p for p, h in zip(ctx.paths, held) if h]

    # 1. the encoder's features of every training input, once
    encoder = TorchEngine(_EncoderFeatures(module), spec.height, spec.width, ctx.deployment.cpu_threads)
    chunks = []
    with encoder:
        for i, (feats, _) in enumerate(ctx.embed(encoder, ctx.read(train_paths))):
            chunks.append(torch.from_numpy(feats).half())
            ctx.progress("features", i + 1, len(train_paths))
    cache = torch.cat(chunks)
    del chunks
    t_features = time.perf_counter() - start

    # 2. train the decoder on the cache
    decoder = module.decoder.train()
    splits = module.encoder.channels
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    rng = np.random.default_rng(ctx.seed)
    n = len(cache)
    batch = min(o.batch, n)
    planned = o.steps or max(1, math.ceil(o.epochs * n / batch))
    total = planned
    budget = o.max_minutes * 60.0
    t_train = time.perf_counter()
    order = np.empty(0, np.int64)
    losses = []
    step = 0
    from engines.heads import reconstruction_distance

    while step < total:
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch], order[batch:]
        x = cache[torch.from_numpy(idx)].float()
        if o.augment == "flips":
            if rng.random() < 0.5:
                x = x.flip(-1)
            if rng.random() < 0.5:
                x = x.flip(-2)
        feats = list(torch.split(x, splits, dim=1))
        warm = max(1, total // 20)
        lr = o.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        loss = reconstruction_distance(feats, decoder(feats)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        elapsed = time.perf_counter() - t_train
        if step == 10 and total > 10:  # the measured step time sets how many steps fit the budget
            total = max(10, min(total, int(budget / (elapsed / step))))
        ctx.progress("train", step, total, f"loss {np.mean(losses[-20:]):.4f}")
        if elapsed > budget:
            total = step
    decoder.eval()
    train_seconds = time.perf_counter() - t_train
    del cache

    # 3. one graph image -> map, and the decoder's weights for the torch runtime
    from engines.export import export_onnx

    torch.save(decoder.state_dict(), ctx.out / "decoder.pt")
    export_onnx(module, spec.height, spec.width, ctx.out / "model.onnx", "maps")

    # 4. calibration: the held-out images through the engine that will serve
    engine = ctx.deployment.build(ctx.out, spec.height, spec.width, lambda: module)
    canvas_maps = []
    with engine:
        for i, (maps, layout) in enumerate(ctx.embed(engine, ctx.read(held_paths))):
            canvas_maps.append(ctx.geometer.stitch(maps, layout))
            ctx.progress("calibrate", i + 1, len(held_paths))
    section = {"network": dataclasses.asdict(o.network), "steps": step, "planned_steps": planned,
               "epochs": round(step * batch / n, 2), "batch": batch, "lr": o.lr, "weight_decay": o.weight_decay,
               "schedule": "linear warm-up over 5% of the steps, then cosine decay to 0", "augment": o.augment,
               "holdout": o.holdout, "stopped_by_max_minutes": step < planned, "final_loss": float(np.mean(losses[-20:])),
               "held_out_images": [str(p) for p in held_paths]}
    summary = {"trained_on": len(train_paths), "held_out": len(held_paths), "steps": step,
               "features_seconds": round(t_features, 2), "train_seconds": round(train_seconds, 2),
               "final_loss": section["final_loss"]}
    return FitOutput(section, canvas_maps, [p.name for p in held_paths], summary,
                     f"{len(held_paths)} training images held out of training", 
                     dataclasses.asdict(module.encoder.backbone.normalisation))


def stride(options: ReconstructionOptions) -> int:
    from engines.backbones import create_backbone

    encoder = options.network.encoder
    return create_backbone(encoder.backbone, "random").stage(encoder.layers[0]).stride


KIND = Kind("reconstruction", lambda manifest: ["model.onnx", "decoder.pt"], ReconstructionOptions, fit, network,
            ReconstructionDetector, stride)
