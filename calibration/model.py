"""A fitted model of any kind in use: what every command and stage reads of a model directory.

`Model`: the validated manifest, read once: kind, input spec, geometry (with its ROI), map
config and thresholds. It needs no engine, so the postprocess workers use it alone.
`Inspector`: a Model with its Detector on a deployment: frames of any size in, one raw canvas
map and image score per frame out (inputs batched across frames, tiles stitched).
`Model.decide`: the verdict, normalised score and defect regions of one frame, for every kind.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np

from calibration.artifact import load_manifest
from calibration.geometry import Geometer, Geometry, InputSpec, Layout
from calibration.kinds import Detector, get_kind
from calibration.maps import MapConfig, even_border, image_score, normalise, regions, smooth, to_frame
from engines.runtimes import Deployment


@dataclasses.dataclass
class Decision:
    """verdict "ok" | "defect"; score: the normalised image score (0.5 is the threshold); regions:
    [(bbox (x, y, w, h), area, peak)] in frame pixels, defective frames only; heat: the normalised
    smoothed map at canvas size (defective frames only, else None); regions and heat are 0 / None outside the ROI."""

    verdict: str
    score: float
    regions: list
    heat: np.ndarray | None = None


class Model:
    """A validated model directory (calibration.artifact), any kind."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.manifest = load_manifest(self.dir)
        self.kind = get_kind(self.manifest["kind"])
        self.spec = InputSpec(**self.manifest["input"])
        self.geometry = Geometry(**self.manifest["geometry"])
        self.maps = MapConfig(**self.manifest["maps"])
        self.thresholds = json.loads((self.dir / "thresholds.json").read_text())
        roi = None
        if self.geometry.roi:
            roi = cv2.imread(str(self.dir / self.geometry.roi), cv2.IMREAD_GRAYSCALE)
        self.geometer = Geometer(self.spec, self.geometry, self.maps.stride, roi)

    def detector(self, deployment: Deployment) -> Detector:
        return self.kind.detector(self.dir, self.manifest, deployment)

    def network(self):
        """The served torch module (torch runtime, GPU paths)."""
        return self.kind.network(self.dir, self.manifest)

    def layout(self, frame: tuple[int, int]) -> Layout:
        return self.geometer.layout(frame)

    def canvas_map(self, maps: np.ndarray, layout: Layout) -> np.ndarray:
        """A frame's input maps float32 [T, h, w] -> its raw canvas map: stitched, border evened, ROI applied."""
        inside = self.geometer.roi_cells(layout) if self.geometer.roi is not None else None
        return even_border(self.geometer.stitch(maps, layout), self.maps, inside)

    def frame_map(self, canvas_map: np.ndarray, layout: Layout) -> np.ndarray:
        """Raw canvas map float32 [h, w] -> the smoothed raw map at the frame's size (0 outside the ROI)."""
        return to_frame(smooth(canvas_map, self.maps), layout.frame, self.geometer.roi_frame(layout.frame))

    def decide(self, canvas_map: np.ndarray, frame: tuple[int, int], raw_score: float,
               heat8: np.ndarray | None = None) -> Decision:
        """A frame's verdict from its image score; for a defect, the regions of its smoothed map at or
        above the pixel threshold, or (when none reach it) the cells behind the image score.
        heat8: the normalised smoothed map x 255 (uint8) when the device path has made it already."""
        score = float(normalise(raw_score, self.thresholds["image"]))
        if score < 0.5:
            return Decision("ok", score, [])
        if heat8 is not None:
            heat = heat8.astype(np.float32) / 255.0
        else:
            heat = normalise(smooth(canvas_map, self.maps), self.thresholds["pixel"])
            roi = self.geometer.roi_frame(heat.shape)
            if roi is not None:
                heat[~roi] = 0.0
        scale = (frame[0] / heat.shape[0], frame[1] / heat.shape[1])
        found = regions(heat >= 0.5, heat, scale)
        if not found:  # the image score crossed its threshold, no pixel crossed its own
            cells = canvas_map >= min(raw_score, float(canvas_map.max()))
            cell_scale = (frame[0] / canvas_map.shape[0], frame[1] / canvas_map.shape[1])
            found = [(box, area, score) for box, area, _ in regions(cells, canvas_map, cell_scale)]
        return Decision("defect", score, found, heat)

    def is_defect(self, raw_score: float) -> bool:
        return float(normalise(raw_score, self.thresholds["image"])) >= 0.5


@dataclasses.dataclass
class Inspection:
    """One frame's raw result: its layout, canvas map float32 [h, w], raw image score and, from the
    device path, the defect heat already smoothed and normalised there (uint8 [Hc, Wc], x 255;
    defective frames only, else None)."""

    layout: Layout
    canvas_map: np.ndarray
    score: float
    heat: np.ndarray | None = None


class Inspector:
    """A Model's detector on a deployment. inspect(frames) batches every frame's inputs, `batch` at a time.

    On a device deployment (torch or TensorRT on CUDA) the whole per-frame path stays on the device
    for frames of one input (resize geometry): the uint8 batch is copied once from page-locked
    memory, the network, the bank search, the image scores, the verdict, and the smoothing and
    normalisation of defective frames' maps run there; scores, small raw maps and the 8-bit heat of
    defective frames come back. Tiled frames stitch on the host. `device_path` forces the device
    path on any torch device (the tests run it on the CPU).
    """

    def __init__(self, model: Model, deployment: Deployment = Deployment(), batch: int = 8,
                 device_path: bool | None = None):
        self.model = model
        self.deployment = deployment
        self.batch = batch
        self.detector = model.detector(deployment)
        self.device_path = deployment.device != "cpu" if device_path is None else device_path
        self.buffer = self._buffer(batch)

    def _buffer(self, n: int) -> np.ndarray:
        shape = (n,) + self.model.spec.shape
        if self.deployment.device == "cpu":
            return np.empty(shape, np.uint8)
        import torch

        return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()  # page-locked: one async copy

    def __enter__(self) -> "Inspector":
        self.detector.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.detector.__exit__(*exc)

    def layouts(self, shapes: list[tuple[int, int]]) -> list[Layout]:
        return [self.model.layout(s) for s in shapes]

    def inspect(self, images: list[np.ndarray], layouts: list[Layout] | None = None) -> list[Inspection]:
        """uint8 RGB frames [H_i, W_i, 3] -> one Inspection each. The inputs of all frames are batched together.
        layouts: each frame's (from its own size); needed where the pixels are smaller than the frame (a JPEG
        decoded at a reduced scale, `Geometer.decode_shrink`), else taken from the pixels' size."""
        geometer = self.model.geometer
        layouts = layouts or self.layouts([im.shape[:2] for im in images])
        total = sum(l.count for l in layouts)
        if total > len(self.buffer):  # tiled frames: grow the reused input buffer
            self.buffer = self._buffer(total)
        done = 0
        for image, layout in zip(images, layouts):
            geometer.prepare(image, layout, self.buffer[done:done + layout.count])
            done += layout.count
        if self.device_path and total == len(layouts):
            return self._inspect_on_device(layouts, total)
        maps = np.concatenate([self.detector.maps(self.buffer[s:min(s + self.batch, total)])
                               for s in range(0, total, self.batch)])
        results, at = [], 0
        for layout in layouts:
            canvas = self.model.canvas_map(maps[at:at + layout.count], layout)
            at += layout.count
            results.append(Inspection(layout, canvas, image_score(canvas, self.model.maps)))
        return results

    def _inspect_on_device(self, layouts: list[Layout], total: int) -> list[Inspection]:
        """One input per frame: maps, scores, verdicts and defective frames' heat computed on the device."""
        import torch

        from calibration.maps import even_border_torch, smooth_torch

        model, config = self.model, self.model.maps
        maps = torch.cat([self.detector.maps_device(self.buffer[s:min(s + self.batch, total)])
                          for s in range(0, total, self.batch)])  # [N, h, w] on the device
        maps = even_border_torch(maps, config)  # the ROI is applied next
        cells = model.geometer.roi_cells(layouts[0])
        if not cells.all():
            maps = maps * torch.from_numpy(cells).to(maps.device)
        flat = maps.reshape(len(maps), -1)
        k = 1 if config.image_score == "max" else min(config.top_k, flat.shape[1])
        scores = flat.topk(k, dim=1).values.mean(dim=1)
        t = model.thresholds
        lo, thr = t["image"]["min"], t["image"]["threshold"]
        defect = (0.5 * (scores - lo) / max(thr - lo, 1e-12)) >= 0.5
        heat_by_frame = {}
        if bool(defect.any()):
            index = torch.nonzero(defect).flatten()
            p_lo, p_thr = t["pixel"]["min"], t["pixel"]["threshold"]
            heat = (0.5 * (smooth_torch(maps[index], config) - p_lo) / max(p_thr - p_lo, 1e-12)).clamp(0, 1)
            roi = model.geometer.roi_frame(tuple(heat.shape[1:]))
            if roi is not None:
                heat = heat * torch.from_numpy(roi).to(heat.device)
            heat8 = (heat * 255).to(torch.uint8).cpu().numpy()  # only the defective frames' 8-bit maps come back
            heat_by_frame = dict(zip(index.cpu().tolist(), heat8))
        maps_host, scores_host = maps.cpu().numpy(), scores.cpu().numpy()  # N small maps, N scores
        return [Inspection(layout, maps_host[i], float(scores_host[i]), heat_by_frame.get(i))
                for i, layout in enumerate(layouts)]
