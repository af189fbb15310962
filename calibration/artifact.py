"""The model artifact: a directory with a manifest, the ONNX graph, the bank and thresholds.

    manifest.json     format version, kind, embedding and bank config, sha256 of every file, versions
    model.onnx        uint8 [N, S, S, 3] -> float32 patch embeddings [N, h, w, d]
    bank.faiss        the memory bank
    thresholds.json   score normalisation and image / pixel thresholds, and the data they came from
    engines/          compiled engines cached per device and precision (not hashed: rebuildable)

`load_manifest` validates everything before any of it is used.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from engines.errors import LineguardError

FORMAT = "lineguard-model"
FORMAT_VERSION = 1
KINDS = ("memory_bank",)
REQUIRED_FILES = {"memory_bank": ("model.onnx", "bank.faiss", "thresholds.json")}


class ArtifactError(LineguardError):
    """A model directory that is missing, incomplete, altered or of an unknown format."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lineguard", "torch", "onnx", "onnxruntime", "faiss-cpu", "numpy", "opencv-python-headless"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict:
    """What a measurement ran on: CPU model, cores, platform and library versions."""
    import os

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "versions": library_versions()}


def write_manifest(model_dir: Path, manifest: dict) -> None:
    """Add format, version, hashes of the required files and library versions; write manifest.json."""
    kind = manifest["kind"]
    files = {name: sha256(model_dir / name) for name in REQUIRED_FILES[kind]}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files,
            "versions": library_versions()}
    (model_dir / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")


def load_manifest(model_dir: str | Path) -> dict:
    """Read and validate a model directory; ArtifactError naming the file and the fix otherwise."""
    model_dir = Path(model_dir)
    refit = f"fit the model again (lineguard fit DATA -o {model_dir})"
    path = model_dir / "manifest.json"
    if not model_dir.is_dir():
        raise ArtifactError(f"model directory {model_dir} not found; give the folder written by lineguard fit")
    if not path.is_file():
        raise ArtifactError(f"{path} not found; {model_dir} is not a lineguard model, {refit}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); {refit}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a lineguard model manifest; {refit}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')}, this lineguard reads "
                            f"version {FORMAT_VERSION}; {refit} or use the lineguard that wrote it")
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ArtifactError(f"{path}: unknown model kind {kind!r}; this lineguard reads {', '.join(KINDS)}")
    files = manifest.get("files", {})
    for name in REQUIRED_FILES[kind]:
        file = model_dir / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; {refit}")
        if files.get(name) != sha256(file):
            raise ArtifactError(f"{file} was altered since the model was fitted (sha256 differs from the "
                                f"manifest); restore it or {refit}")
    return manifest
