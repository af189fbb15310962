"""Compiled engines in a model's ``engines/`` folder: their names and the record that validates them.

Every compiled engine sits beside a JSON record: the runtime and precision, the sha256 of the
``model.onnx`` it was built from and of itself, and the CPU features it was validated on (int8
kernels differ by instruction set). A stale, altered or foreign engine is refused with the command
that rebuilds it, before any stage starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from engines.errors import ArtifactError

if TYPE_CHECKING:
    from engines.runtimes import Deployment

# instruction-set features that change which int8 / fp32 kernels ONNX Runtime picks: on x86, then on
# Arm (dot product, int8 matrix multiply, SVE), as /proc/cpuinfo names them
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8",
                "asimddp", "i8mm", "sve")
CPUINFO = Path("/proc/cpuinfo")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# CPU_FEATURES as numpy's runtime dispatcher names them: it asks CPUID, as ONNX Runtime does (an
# emulated CPU answers for itself there, while /proc/cpuinfo describes the host)
_NUMPY_NAMES = {"avx2": "AVX2", "fma": "FMA3", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512vl": "AVX512VL",
                "avx512_vnni": "AVX512VNNI"}


def cpu_features(cpuinfo: Path = CPUINFO) -> list[str]:
    """The CPU_FEATURES this CPU has: CPUID through numpy; the rest from /proc/cpuinfo (x86 "flags",
    Arm "Features")."""
    import numpy as np

    known = np._core._multiarray_umath.__cpu_features__
    fields = _cpuinfo(cpuinfo)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return [f for f in CPU_FEATURES if (known.get(_NUMPY_NAMES[f], False) if f in _NUMPY_NAMES else f in flags)]


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name: x86's "model name"; an Arm core's implementer and part numbers where the
    kernel names no model (a Jetson's or a Graviton's cores); else what the platform says."""
    import platform

    fields = _cpuinfo(cpuinfo)
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("CPU part"):
        return f"{platform.machine() or 'arm'} implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.processor() or platform.machine()


def _cpuinfo(path: Path) -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_identity() -> str:
    """This CPU as far as the speed of search code goes: its model name and CPU_FEATURES, e.g.
    "AMD EPYC: avx2 fma avx512f ..." (two hosts of one identity choose the same bank index)."""
    return f"{cpu_model()}: {' '.join(cpu_features())}"


def gpu_name() -> str:
    """The first CUDA device's name, file-name safe (a TensorRT plan runs only on the GPU model it was built for)."""
    import torch

    if not torch.cuda.is_available():
        raise ArtifactError("TensorRT engines are built and run on a CUDA GPU; torch sees none here")
    return torch.cuda.get_device_name(0).replace(" ", "_").replace("/", "_")


def engine_path(model_dir: Path, runtime: str, precision: str) -> Path:
    """engines/onnxruntime-int8.onnx, engines/tensorrt-<gpu>-<precision>.plan."""
    if runtime == "tensorrt":
        return Path(model_dir) / "engines" / f"tensorrt-{gpu_name()}-{precision}.plan"
    return Path(model_dir) / "engines" / f"{runtime}-{precision}.onnx"


def export_command(model_dir: Path, runtime: str, precision: str) -> str:
    return f"lineguard export {model_dir} --runtime {runtime} --precision {precision}"


def write_record(path: Path, record: dict) -> dict:
    """Complete `record` with the sha256 of the engine and of the model.onnx beside it; write <engine>.json."""
    full = {**record, "sha256": sha256(path), "source_sha256": sha256(path.parent.parent / "model.onnx")}
    path.with_suffix(".json").write_text(json.dumps(full, indent=2) + "\n")
    return full


def read_record(path: Path) -> dict:
    settings = path.with_suffix(".json")
    try:
        return json.loads(settings.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{settings} is unreadable ({exc})") from None


def engine_file(model_dir: Path, deployment: "Deployment") -> Path:
    """The compiled engine for a deployment, validated against the model it came from and this CPU."""
    runtime, precision = deployment.runtime, deployment.precision
    path = engine_path(model_dir, runtime, precision)
    rebuild = export_command(model_dir, runtime, precision)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise ArtifactError(f"{path} not found; build it first with: {rebuild}")
    record = read_record(path)
    if record.get("source_sha256") != sha256(Path(model_dir) / "model.onnx"):
        raise ArtifactError(f"{path} was built from another model.onnx than this model's; rebuild it: {rebuild}")
    if record.get("sha256") != sha256(path):
        raise ArtifactError(f"{path} was altered since it was built; rebuild it: {rebuild}")
    if runtime == "onnxruntime" and record.get("cpu_features") != cpu_features():
        raise ArtifactError(f"{path} was validated on a CPU with {record.get('cpu_features')}, this one has "
                            f"{cpu_features()}: int8 kernels differ by instruction set; validate it here: {rebuild}")
    return path
