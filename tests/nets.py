"""Random-weight networks for tests that compare numbers."""

from __future__ import annotations

import torch


def rescale_convs(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """He-normal conv weights: torch's default init shrinks activations to ~1e-8 by stage6
    (denormals: slow, and no tolerance means anything)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / mod.weight[0].numel()) ** 0.5)
    return model
