"""Normal images -> a deployable model directory, for every kind.

The driver is kind-neutral: it reads the training images of one or more datasets (several make
one multi-class model), chooses the input (the training frames' aspect ratio at about 256 x 256
pixels, unless set), writes the ROI, hands a `FitContext` to the kind's `fit`, evens out the map
border and calibrates the thresholds from the held-out normal maps the kind returns, and writes
the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from calibration.artifact import new_model_dir, write_manifest
from calibration.dataset import image_size, read_frames, sample_bits, train_images
from calibration.geometry import Geometer, Geometry, InputSpec, Layout, input_for_frames
from calibration.kinds import get_kind
from calibration.maps import MapConfig, even_border, fit_border
from calibration.thresholds import calibrate
from engines.errors import ConfigError
from engines.runtimes import Deployment

Progress = Callable[..., None]  # (stage, done, total, note="") -> None


def _quiet(stage: str, done: int, total: int, note: str = "") -> None:
    pass


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything `fit` needs besides the data; written into the manifest.

    kind: a registered model kind; options: that kind's options (None: its defaults); input: the
    network input (None: chosen from the training frames); geometry: resize or tiles, and the ROI
    (`roi`: "x,y,w,h" or a mask file, read at fit time); maps: smoothing and image score;
    calib_images: at most this many held-out normal frames calibrate the thresholds;
    max_false_reject: the false-reject target on normal frames (None: the largest normal score).
    """

    kind: str = "memory_bank"
    options: Any = None
    input: InputSpec | None = None
    geometry: Geometry = Geometry()
    roi: str | None = None
    maps: MapConfig = MapConfig()
    weights: str | None = None
    calib_images: int = 100
    max_false_reject: float | None = None
    deployment: Deployment = Deployment()
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        kind = get_kind(self.kind)
        if self.options is None:
            object.__setattr__(self, "options", kind.options())
        elif not isinstance(self.options, kind.options):
            raise ConfigError(f"{type(self.options).__name__} are not options of the {self.kind} kind")
        if self.deployment.runtime == "tensorrt" or self.deployment.precision != "fp32":
            raise ConfigError("fit runs the network with onnxruntime or torch at fp32 (--runtime, --device); "
                              "compile other precisions afterwards with lineguard export")
        if self.calib_images < 1 or self.batch_size < 1:
            raise ConfigError("calib images and batch size must be at least 1")
        if self.max_false_reject is not None and not 0.0 < self.max_false_reject < 1.0:
            raise ConfigError(f"--max-false-reject {self.max_false_reject} must be in (0, 1), e.g. 0.01")


@dataclasses.dataclass
class FitOutput:
    """What a kind's fit returns: its manifest section, the raw canvas maps of its held-out normal
    frames (with their names) for the thresholds, a summary, how those frames were held out, and the
    input normalisation of its network."""

    section: dict
    canvas_maps: list[np.ndarray]
    names: list[str]
    summary: dict
    held_out: str
    normalisation: dict


@dataclasses.dataclass
class FitContext:
    """What a kind's fit works with. paths: every training image (all datasets, sorted per dataset);
    categories: the dataset index of each path; out: the model directory being written."""

    paths: list[Path]
    categories: list[int]
    out: Path
    spec: InputSpec
    geometer: Geometer
    maps: MapConfig
    options: Any
    weights: str | None
    deployment: Deployment
    batch_size: int
    calib_images: int
    seed: int
    progress: Progress

    def read(self, paths: list[Path]) -> Iterator[tuple[Layout, np.ndarray]]:
        """Each file's (layout, pixels), decoded as the inference workers decode it (`read_frames`)."""
        return read_frames(paths, self.geometer)

    def embed(self, engine, frames) -> Iterator[tuple[np.ndarray, Layout]]:
        """(engine output float32 [T, ...], layout) per (layout, uint8 RGB pixels) of `frames`, the inputs
        of several frames batched `batch_size` at a time."""
        size = self.batch_size
        buffer = np.empty((size,) + self.spec.shape, np.uint8)
        waiting: list[tuple[int, Layout]] = []  # (rows in buffer, layout) of frames not yet run
        used = 0

        def flush():
            nonlocal used
            out = engine.infer(buffer[:used]) if used else None
            results, at = [], 0
            for rows, layout in waiting:
                results.append((out[at:at + rows], layout))
                at += rows
            waiting.clear()
            used = 0
            return results

        for layout, image in frames:
            if layout.count > size:  # a frame of many tiles runs on its own
                yield from flush()
                tiles = np.empty((layout.count,) + self.spec.shape, np.uint8)
                self.geometer.prepare(image, layout, tiles)
                out = np.concatenate([engine.infer(tiles[s:s + size]) for s in range(0, layout.count, size)])
                yield out, layout
                continue
            if used + layout.count > size:
                yield from flush()
            self.geometer.prepare(image, layout, buffer[used:used + layout.count])
            waiting.append((layout.count, layout))
            used += layout.count
        yield from flush()

    def geometer_cells(self, layout: Layout) -> np.ndarray:
        """bool [T, h, w]: which cells of each input lie inside the ROI (all, without one)."""
        cells = self.geometer.roi_cells(layout)
        h, w = self.spec.height // self.maps.stride, self.spec.width // self.maps.stride
        s = self.maps.stride
        return np.stack([cells[y // s:y // s + h, x // s:x // s + w] for y, x in layout.origins])


def frame_sizes(paths: list[Path], sample: int = 200) -> list[tuple[int, int]]:
    """(H, W) of a spread sample of the training images: headers only, cheap."""
    return [image_size(p) for p in paths[::max(1, len(paths) // sample)]]


FINE_CELL = 16  # frame pixels a map cell may cover before fit suggests tiles (two cells of the default at 256)


def resolution(geometer: Geometer, frame: tuple[int, int]) -> dict:
    """What a map cell covers of the typical frame (H, W): "cell_pixels" (frame pixels per cell side, the
    larger side) and "inputs_per_frame"; when cells exceed FINE_CELL pixels under resize, "finer": the
    tile scale that halves them and its inputs per frame (a defect of a few pixels then keeps some)."""
    layout = geometer.layout(frame)
    cell = max(frame[0] / layout.grid[0], frame[1] / layout.grid[1])
    out = {"cell_pixels": round(cell, 1), "inputs_per_frame": layout.count}
    if geometer.geometry.tiling == "resize" and cell > FINE_CELL:
        scale = round(2 * geometer.stride / cell, 3)
        tiles = Geometer(geometer.spec, dataclasses.replace(geometer.geometry, tiling="tiles", scale=scale),
                         geometer.stride, geometer.roi)  # tiles wholly outside the ROI are not inputs
        out["finer"] = {"tile_scale": scale, "inputs_per_frame": tiles.layout(frame).count}
    return out


def fit(datas: list[str | Path] | str | Path, out: str | Path, config: FitConfig = FitConfig(),
        progress: Progress | None = None) -> dict:
    """Fit a model on <data>/train/good of each dataset and write it to out; returns a summary dict."""
    start = time.perf_counter()
    datas = [Path(d) for d in (datas if isinstance(datas, (list, tuple)) else [datas])]
    paths, categories = [], []
    for k, data in enumerate(datas):
        found = train_images(data)
        paths += found
        categories += [k] * len(found)
    out = Path(out)
    progress = progress or _quiet
    sizes = frame_sizes(paths)
    frame = tuple(int(v) for v in np.median(sizes, axis=0))  # the typical training frame (H, W)
    spec = config.input or input_for_frames(sizes)
    kind = get_kind(config.kind)
    maps = dataclasses.replace(config.maps, stride=kind.stride(config.options))
    with new_model_dir(out) as out:  # written beside it, put in its place once whole
        geometry, roi = dataclasses.replace(config.geometry, bits=sample_bits(paths)), None
        if config.roi:
            from calibration.geometry import read_roi

            roi = read_roi(config.roi, frame)
            cv2.imwrite(str(out / "roi.png"), roi)
            geometry = dataclasses.replace(geometry, roi="roi.png")
        geometer = Geometer(spec, geometry, maps.stride, roi)
        ctx = FitContext(paths, categories, out, spec, geometer, maps, config.options, config.weights,
                         config.deployment, config.batch_size, config.calib_images, config.seed, progress)
        result = kind.fit(ctx)
        s = maps.stride
        insides = [geometer.roi_cells(Layout((0, 0), (m.shape[0] * s, m.shape[1] * s), (), s))
                   if roi is not None else None for m in result.canvas_maps]
        maps = dataclasses.replace(maps, border=fit_border(result.canvas_maps, maps.border_rings, insides))
        canvas_maps = [even_border(m, maps, inside) for m, inside in zip(result.canvas_maps, insides)]
        thresholds = calibrate(canvas_maps, maps, config.max_false_reject, result.held_out, result.names)
        thresholds["data"] = [str(d) for d in datas]
        (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
        summary = {"kind": config.kind, "train_images": len(paths), "input": [spec.height, spec.width],
                   "tiling": geometry.tiling, **result.summary, **resolution(geometer, frame),
                   "fit_seconds": round(time.perf_counter() - start, 2)}
        write_manifest(out, {
            "kind": config.kind,
            "input": dataclasses.asdict(spec),
            "frame": list(frame),
            "geometry": dataclasses.asdict(geometry),
            "maps": dataclasses.asdict(maps),
            config.kind: result.section,
            "weights": config.weights,
            "normalisation": result.normalisation,
            "categories": [d.name for d in datas],
            "fit": {"deployment": dataclasses.asdict(config.deployment), "batch_size": config.batch_size,
                    "seed": config.seed, "calib_images": config.calib_images,
                    "max_false_reject": config.max_false_reject, **summary,
                    "data": [str(d.resolve()) for d in datas]},
        })
    return summary
