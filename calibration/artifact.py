"""The model artifact: a directory with a manifest, the kind's files and the thresholds.

    manifest.json     format version 2, kind, input spec, geometry, map config, the kind's own
                      section, fit settings and timings, sha256 of every file, library versions
    thresholds.json   score normalisation and image / pixel thresholds, and the data they came from
    roi.png           the region-of-interest mask (only when the model has one)
    <kind files>      memory_bank: model.onnx, bank.faiss (index auto: and the other candidate index,
                      the patches both were timed on); reconstruction: model.onnx, decoder.pt;
                      ensemble: members/<i>/ (whole models, validated in turn)
    engines/          compiled engines cached per device and precision, the bank index timed fastest
                      on each CPU kind (not hashed: rebuildable)

`load_manifest` validates everything before any of it is used. Version-1 artifacts (square
memory banks) are read as the version-2 manifest they are equivalent to.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from engines.compiled import sha256
from engines.errors import ArtifactError

log = logging.getLogger("lineguard.artifact")

FORMAT = "lineguard-model"
FORMAT_VERSION = 2

__all__ = ["ArtifactError", "FORMAT_VERSION", "load_manifest", "write_manifest", "machine_info", "sha256"]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lineguard", "torch", "onnx", "onnxruntime", "faiss-cpu", "numpy", "opencv-python-headless",
                 "pyzmq", "msgpack", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict:
    """What a measurement ran on: CPU model and features, cores, platform and library versions."""
    import os

    from engines.compiled import cpu_features, cpu_model
    from engines.runtimes import usable_cores

    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "platform": platform.platform(),
            "versions": library_versions()}


def required_files(manifest: dict) -> list[str]:
    from calibration.kinds import get_kind

    files = list(get_kind(manifest["kind"]).files(manifest)) + ["thresholds.json"]
    if manifest.get("geometry", {}).get("roi"):
        files.append(manifest["geometry"]["roi"])
    return files


def write_manifest(model_dir: Path, manifest: dict) -> dict:
    """Add format, version, hashes of the required files and library versions; write manifest.json."""
    files = {name: sha256(model_dir / name) for name in required_files(manifest)}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files,
            "versions": library_versions()}
    (model_dir / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
    return full


def replace_json(path: Path, data) -> None:
    """Write `data` as JSON to `path` whole or not at all: a scratch file beside it, on disk, then renamed
    over it, so a reader (or a process killed meanwhile) finds the earlier file or this one."""
    scratch = Path(path).with_suffix(f".{os.getpid()}.tmp")
    with open(scratch, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(scratch, path)


def writable_folder(folder: Path) -> Path:
    """Make `folder` (and its parents) and check it can be written; OSError naming the path otherwise
    (a file where a folder must be, read-only, no permission), for `lineguard` to say in one line."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(folder))
    return folder


@contextlib.contextmanager
def new_model_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to write a model into, put in its place only when the writing has
    finished: a fit that fails or is interrupted leaves `out` as it was (the earlier model, or nothing),
    never half a model. `out` may be absent, an empty folder or a lineguard model (replaced); a symbolic
    link is followed (the model it points to is replaced); anything else is refused before any work,
    so nothing of the user's is overwritten. The model folder gets the usual permissions (umask), and
    what a killed fit left beside `out` is removed."""
    out = Path(os.path.realpath(out))  # "." and ".." named, a link followed: the folder that is replaced
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"output {out} is a file; choose a directory for the model (-o DIR)")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise ArtifactError(f"output {out} exists and is not a lineguard model; choose an empty or new "
                                "directory (-o DIR) so nothing of yours is overwritten")
        if Path.cwd().is_relative_to(out):
            raise ArtifactError(f"output {out} is the current folder or holds it, which a model cannot replace; "
                                "give a folder beside it or below it (-o DIR)")
        if os.path.ismount(out):
            raise ArtifactError(f"output {out} is a mount point, which cannot be replaced whole; give a folder "
                                f"inside it (-o {out / 'model'})")
    writable_folder(out.parent)
    _remove_leftovers(out)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        scratch.chmod(0o777 & ~umask)  # mkdtemp's folder is its owner's alone; a model is read by its servers
        yield scratch
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-{os.getpid()}-", dir=out.parent))
            out.rename(old)  # onto the empty folder: a name no other fit holds
            scratch.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():  # files of another user under engines/, say: the new model is in place all the same
                log.warning("the earlier model was replaced but not all of it could be removed: %s", old)
        else:
            scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _remove_leftovers(out: Path) -> None:
    """Remove what fits killed outright (kill -9, a power cut) left beside `out`: folders named
    .<name>.writing-<pid>-* or .<name>.replaced-<pid>-* whose process no longer runs (or is this one,
    a pid reused)."""
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = leftover.name[len(out.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("writing", "replaced") and pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _upgrade_v1(manifest: dict) -> dict:
    """A version-1 manifest (square memory bank, max patch image score) as version 2."""
    emb = dict(manifest["embedding"])
    size = emb.pop("input_size")
    emb.update(weighting="equal", context=0, pool_padding="exclude")
    grid = manifest["grid"]
    out = {k: v for k, v in manifest.items() if k not in ("embedding", "bank", "scoring", "grid", "input")}
    out.update(format_version=FORMAT_VERSION, upgraded_from=1,
               input={"height": size, "width": size, "channels": 3, "layout": "NHWC", "dtype": "uint8"},
               geometry={"tiling": "resize", "scale": 1.0, "overlap": 0.25, "roi": None, "photometric": "none",
                         "jpeg_decode": "full"},
               maps={"stride": size // grid[0], "blur_sigma": manifest["scoring"]["blur_sigma"], "image_score": "max",
                     "top_k": 10},
               memory_bank={"embedding": emb, "bank": manifest["bank"], "feature_dim": manifest["feature_dim"],
                            "shots": 0})
    return out


def _added_defaults(manifest: dict) -> None:
    """Settings added after a manifest was written take the value its model was fitted with."""
    if isinstance(manifest.get("geometry"), dict):
        manifest["geometry"].setdefault("photometric", "none")  # before it was an option, pixels came as they were
        manifest["geometry"].setdefault("jpeg_decode", "full")  # and every JPEG was decoded at its own size
    if isinstance(manifest.get("maps"), dict):
        manifest["maps"].setdefault("border_rings", 0)  # and maps were used as the network made them
    bank = manifest.get("memory_bank", {}).get("bank")
    if isinstance(bank, dict):
        bank.setdefault("hnsw_storage", "fp32")  # and HNSW banks held fp32 vectors (the file holds its own)
    sections = [manifest.get("memory_bank", {}).get("embedding"),
                manifest.get("reconstruction", {}).get("network", {}).get("encoder")]
    for section in sections:
        if isinstance(section, dict):
            section.setdefault("pool_padding", "exclude")  # before it was an option, border cells were never padded


def load_manifest(model_dir: str | Path) -> dict:
    """Read and validate a model directory; ArtifactError naming the file and the fix otherwise."""
    from calibration.kinds import kind_names

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
    version = manifest.get("format_version")
    data = manifest.get("fit", {}).get("data")
    if data:
        refit = f"fit the model again (lineguard fit {' '.join(data) if isinstance(data, list) else data} -o {model_dir})"
    if version == 1 and manifest.get("kind") == "memory_bank":
        manifest = _upgrade_v1(manifest)
    elif version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {version}, this lineguard reads versions 1 and "
                            f"{FORMAT_VERSION}; {refit} or use the lineguard that wrote it")
    _added_defaults(manifest)
    if manifest.get("kind") not in kind_names():
        raise ArtifactError(f"{path}: unknown model kind {manifest.get('kind')!r}; this lineguard reads "
                            f"{', '.join(kind_names())}; {refit}")
    files = manifest.get("files", {})
    for name in required_files(manifest):
        file = model_dir / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; {refit}")
        if files.get(name) != sha256(file):
            raise ArtifactError(f"{file} was altered since the model was fitted (sha256 differs from the "
                                f"manifest); restore it or {refit}")
    return manifest
