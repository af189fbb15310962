"""The ensemble kind: several fitted models of the same input served as one, their maps fused.

`fuse` copies each member model into ``members/<i>/`` (validated like any model when loaded).
Each member's raw map m is first put in its own threshold units, u = (m - min) / (threshold -
min) with its image threshold and lowest normal score, so 1 is that member's threshold and the
members' scales agree; then u is fused cell by cell (mean or max). The ensemble's image threshold
is therefore 1 (with max fusion: a frame is defective when one member says so); its pixel
threshold is the members' pixel thresholds in the same units: their mean, or (max fusion) the lowest.
The members' maps are fused as their networks make them: their fitted border evening
(calibration.maps) is a canvas-level step the fused map does not repeat.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from calibration.artifact import load_manifest, new_model_dir, sha256, write_manifest
from calibration.kinds import Detector, Kind
from calibration.maps import even_border, even_border_torch
from engines.errors import ConfigError
from engines.runtimes import Deployment

FUSIONS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
    fusion: str = "mean"
    FLAGS = ()

    @classmethod
    def from_flags(cls, flags: dict, seed: int = 0) -> "EnsembleOptions":
        return cls()

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}")


def _units(thresholds: dict) -> tuple[float, float]:
    lo, thr = thresholds["image"]["min"], thresholds["image"]["threshold"]
    return lo, max(thr - lo, 1e-12)


def _fuse(stack: np.ndarray, fusion: str) -> np.ndarray:
    return stack.max(axis=0) if fusion == "max" else stack.mean(axis=0)


class EnsembleDetector(Detector):
    """Every member's detector on the same inputs; their maps border-evened as the member's own (its
    thresholds were set on those), in threshold units, fused. One input is one frame's canvas (`fuse`
    refuses tiled members with an evened border), so a member's rings are its input's rings."""

    def __init__(self, model_dir: Path, manifest: dict, deployment: Deployment):
        from calibration.model import Model

        super().__init__(None)
        self.fusion = manifest["ensemble"]["fusion"]
        self.members = []
        for name in manifest["ensemble"]["members"]:
            member = Model(Path(model_dir) / name)
            self.members.append((member.detector(deployment), _units(member.thresholds), member.maps))

    def __enter__(self) -> "EnsembleDetector":
        for detector, *_ in self.members:
            detector.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for detector, *_ in self.members:
            detector.__exit__(*exc)

    def maps(self, inputs: np.ndarray) -> np.ndarray:
        stack = np.stack([(np.stack([even_border(m, config) for m in d.maps(inputs)]) - lo) / scale
                          for d, (lo, scale), config in self.members])
        return _fuse(stack, self.fusion).astype(np.float32)

    def maps_device(self, inputs: np.ndarray):
        import torch

        stack = torch.stack([(even_border_torch(d.maps_device(inputs), config) - lo) / scale
                             for d, (lo, scale), config in self.members])
        return stack.amax(0) if self.fusion == "max" else stack.mean(0)


def _fit(ctx):
    raise ConfigError("an ensemble is made from fitted models: lineguard fuse MODEL_A MODEL_B -o OUT")


def _files(manifest: dict) -> list[str]:
    return [f"{name}/manifest.json" for name in manifest["ensemble"]["members"]]


def parts(model_dir: Path, manifest: dict) -> list[Path]:
    return [Path(model_dir) / name for name in manifest["ensemble"]["members"]]


def fuse(models: list[str | Path], out: str | Path, options: EnsembleOptions = EnsembleOptions()) -> dict:
    """Write an ensemble of `models` (at least two, same input and geometry) to `out`; returns its manifest."""
    if len(models) < 2:
        raise ConfigError("fuse needs at least two models")
    out = Path(out)
    manifests = [load_manifest(m) for m in models]
    first = manifests[0]
    for path, m in zip(models[1:], manifests[1:]):
        for key in ("input", "geometry"):
            if m[key] != first[key]:
                raise ConfigError(f"{path} has {key} {m[key]}, {models[0]} has {first[key]}: fused models must "
                                  f"share their input and geometry; refit one with the other's --input-size, tiling, "
                                  "--photometric or --jpeg-decode")
        if m["maps"]["stride"] != first["maps"]["stride"]:
            raise ConfigError(f"{path} has map stride {m['maps']['stride']}, {models[0]} {first['maps']['stride']}: "
                              "fused models must map on the same grid")
    for path, m in zip(models, manifests):
        if m["geometry"]["tiling"] != "resize" and m["maps"].get("border"):
            raise ConfigError(f"{path} covers its frames with tiles and evens its map's border: a fused model "
                              "evens each member's border per input, which is a tile there; refit the tiled "
                              "members with --border-rings 0")
    rois = {sha256(Path(path) / m["geometry"]["roi"]) if m["geometry"].get("roi") else None
            for path, m in zip(models, manifests)}
    if len(rois) > 1:
        raise ConfigError(f"{', '.join(map(str, models))} score different regions (their ROI files differ): "
                          "fused models must share their ROI; refit one with the other's --roi")
    with new_model_dir(out) as out:  # written beside it, put in its place once whole
        members = []
        for i, model in enumerate(models):
            name = f"members/{i}"
            shutil.copytree(model, out / name, ignore=shutil.ignore_patterns("engines"))
            members.append(name)
        if first["geometry"].get("roi"):
            shutil.copy(Path(models[0]) / first["geometry"]["roi"], out / first["geometry"]["roi"])
        pixel_units, normal_images = [], []
        for model in models:
            t = json.loads((Path(model) / "thresholds.json").read_text())
            lo, scale = _units(t)
            pixel_units.append((t["pixel"]["threshold"] - lo) / scale)
            normal_images.append(t.get("n_images", 0))
        pixel = min(pixel_units) if options.fusion == "max" else float(np.mean(pixel_units))
        thresholds = {"method": f"members' maps in their own image-threshold units (1 = threshold), fused by "
                                f"{options.fusion}", "image": {"threshold": 1.0, "min": 0.0},
                      "pixel": {"threshold": float(pixel), "min": 0.0}, "members": members,
                      "n_images": min(normal_images)}  # the fewest normal images a member was calibrated on
        (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
        maps = {**first["maps"], "border_rings": 0, "border": []}  # the fused map: members' borders not evened
        manifest = write_manifest(out, {
            "kind": "ensemble", "input": first["input"], "geometry": first["geometry"], "maps": maps,
            "ensemble": {"fusion": options.fusion, "members": members,
                         "kinds": [m["kind"] for m in manifests], "sources": [str(Path(m).resolve()) for m in models]},
            "categories": first.get("categories", []),
            "fit": {"fused_from": [str(m) for m in models]},
        })
    return manifest


KIND = Kind("ensemble", _files, EnsembleOptions, _fit, None, EnsembleDetector, lambda options: _fit(None), parts)
