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


def int8_or_refusal(model_dir, **kwargs):
    """Export the model's int8 engine (calibration.int8.quantize_onnxruntime) and return its records.

    Measured (bench/results/int8-isa-*.json): with VNNI the engine holds the bar; without it ONNX
    Runtime's int8 kernels saturate and the export's validation may refuse it. So on a CPU without
    VNNI a refusal is accepted, after checking that it says why and that no engine is left, and the
    calling test is skipped with that reason; with VNNI a refusal fails the test.
    """
    import pytest

    from calibration.int8 import quantize_onnxruntime
    from engines.compiled import cpu_features, engine_path
    from engines.errors import ConfigError

    try:
        return quantize_onnxruntime(model_dir, **kwargs)
    except ConfigError as exc:
        message = str(exc)
        assert "fails validation" in message and "--precision fp32" in message, message
        assert not engine_path(model_dir, "onnxruntime", "int8").exists()
        if {"avx512_vnni", "avx_vnni"} & set(cpu_features()):
            pytest.fail(f"int8 refused on a CPU with VNNI: {message}")
        pytest.skip(f"int8 refused on this CPU without VNNI, as it should be where it cannot hold: {message}")
