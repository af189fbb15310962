"""Input geometry: how a frame of any size becomes model inputs, and how anomaly maps come back.

Every model takes uint8 [N, height, width, 3] (its `InputSpec`, declared once in the manifest).
A frame [H0, W0] is first scaled onto a *canvas*, then cut into inputs:

- ``resize``: the canvas is the input itself (the frame resized to height x width; its aspect
  changes when it differs from the model's, which is chosen from the training images');
- ``tiles``: the frame is scaled by ``scale`` (frame pixels -> canvas pixels), keeping its aspect,
  and covered by overlapping height x width tiles, neighbours sharing at least ``overlap`` of a
  tile. Small defects keep their pixels on large frames; each tile is one model input.

A model's anomaly map has one cell per ``stride`` canvas pixels. Tile maps are stitched into one
canvas map by a weighted mean (weights fall towards each tile's edges, where the network sees
padding). A region of interest (a mask at any size, resized to each frame) confines scoring: the
input is mid-grey outside it (so what lies there cannot reach the scores inside), cells outside
it score 0 and tiles entirely outside it are not computed.

Photometric standardisation (``photometric="frame"``, the default): before it is cut into inputs,
each canvas gets one gain and offset for all its channels so that its pixels (inside the ROI) have
mean 127.5 and standard deviation 64 (a typical natural image's), saturating at 0 and 255. A line
whose exposure or lighting drifts from frame to frame is then compared with its normal frames at
one brightness and contrast, and the bank's neighbours come from every exposure; the gain is at most
64 / 8, so a nearly flat frame's noise is not blown up. Overlays show the frame as it came.

JPEG decoding (``jpeg_decode="scaled"``, the default): a JPEG frame at least twice the canvas in both
sides is decoded at 1/2, 1/4 or 1/8 of its size (the most reduction that still covers the canvas,
`Geometer.decode_shrink`) by libjpeg's scaled inverse DCT, then resized to the canvas as any frame is.
Fit, eval, int8 calibration and the workers decode alike; maps, regions and masks stay in frame pixels
(the layout carries the frame's own size).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from calibration.images import JPEG_SHRINKS, resize, shrunk
from engines.errors import ConfigError

TILINGS = ("resize", "tiles")
PHOTOMETRICS = ("frame", "none")
JPEG_DECODES = ("scaled", "full")
ROI_FILL = 127  # the input pixels outside a region of interest
STANDARD_MEAN, STANDARD_STD, LEAST_STD = 127.5, 64.0, 8.0  # photometric="frame": the target, the gain's bound


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model's network takes: uint8 [N, height, width, channels] images, NHWC, RGB."""

    height: int = 256
    width: int = 256
    channels: int = 3
    layout: str = "NHWC"
    dtype: str = "uint8"

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 32 or value % 32:
                raise ConfigError(f"input {name} {value} must be a multiple of 32, at least 32 (e.g. 256)")
        if (self.channels, self.layout, self.dtype) != (3, "NHWC", "uint8"):
            raise ConfigError(f"input must be uint8 NHWC with 3 channels, got {self.dtype} {self.layout} "
                              f"with {self.channels}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels


@dataclasses.dataclass(frozen=True)
class Geometry:
    """tiling: "resize" | "tiles"; scale: canvas pixels per frame pixel (tiles); overlap: the least
    fraction of a tile shared with its neighbour (tiles); roi: the artifact file holding the
    region-of-interest mask (None: the whole frame); photometric: "frame" standardises each canvas's
    brightness and contrast (`standardise`), "none" leaves the pixels as they come; jpeg_decode: "scaled"
    decodes a large JPEG frame at a reduced scale that still covers the canvas (`Geometer.decode_shrink`),
    "full" at its own size; bits: the significant bits of 16-bit frames (fit reads it from the training
    images: 12-bit data in 16-bit files is scaled by 12, `images.significant_bits`)."""

    tiling: str = "resize"
    scale: float = 1.0
    overlap: float = 0.25
    roi: str | None = None
    photometric: str = "frame"
    jpeg_decode: str = "scaled"
    bits: int = 16

    def __post_init__(self):
        if self.tiling not in TILINGS:
            raise ConfigError(f"unknown tiling {self.tiling!r}; valid: {', '.join(TILINGS)}")
        if not 0.0 < self.scale <= 8.0:
            raise ConfigError(f"tile scale {self.scale} must be in (0, 8]: canvas pixels per frame pixel, e.g. 1.0")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"tile overlap {self.overlap} must be in [0, 1), e.g. 0.25")
        if self.photometric not in PHOTOMETRICS:
            raise ConfigError(f"unknown photometric standardisation {self.photometric!r}; "
                              f"valid: {', '.join(PHOTOMETRICS)}")
        if self.jpeg_decode not in JPEG_DECODES:
            raise ConfigError(f"unknown JPEG decoding {self.jpeg_decode!r}; valid: {', '.join(JPEG_DECODES)}")
        if not 8 <= self.bits <= 16:
            raise ConfigError(f"{self.bits} significant bits of 16-bit frames; expected 8 to 16")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one frame's inputs lie. frame: (H0, W0); canvas: (Hc, Wc) pixels; origins: the top-left
    (y, x) canvas pixel of each input, multiples of `stride`; grid: the canvas map's cells (Hc/stride, Wc/stride)."""

    frame: tuple[int, int]
    canvas: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    stride: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.canvas[0] // self.stride, self.canvas[1] // self.stride

    @property
    def count(self) -> int:
        return len(self.origins)


def _positions(length: int, tile: int, overlap: float, stride: int) -> list[int]:
    """Tile starts covering [0, length), evenly spread, multiples of stride, the last ending at length."""
    if length <= tile:
        return [0]
    step = tile * (1.0 - overlap)
    n = math.ceil((length - tile) / step) + 1
    starts = {int(round(i * (length - tile) / (n - 1) / stride)) * stride for i in range(n)}
    return sorted(starts)


class Geometer:
    """A model's InputSpec + Geometry + ROI mask, applied to frames. Shared by fit, eval and the workers."""

    def __init__(self, spec: InputSpec, geometry: Geometry, stride: int, roi: np.ndarray | None = None):
        if spec.height % stride or spec.width % stride:
            raise ConfigError(f"input {spec.height}x{spec.width} is not a multiple of the map stride {stride}")
        self.spec, self.geometry, self.stride = spec, geometry, stride
        self.roi = None if roi is None else np.ascontiguousarray(roi, dtype=np.uint8)  # [Hr, Wr], nonzero inside
        self._roi_masks: dict[tuple[int, int], np.ndarray] = {}
        self._roi_frames: dict[tuple[int, int], np.ndarray] = {}

    def layout(self, frame: tuple[int, int]) -> Layout:
        h, w = int(frame[0]), int(frame[1])
        th, tw, s = self.spec.height, self.spec.width, self.stride
        if self.geometry.tiling == "resize":
            return Layout((h, w), (th, tw), ((0, 0),), s)
        g = self.geometry
        ch = max(th, int(round(h * g.scale / s)) * s)
        cw = max(tw, int(round(w * g.scale / s)) * s)
        origins = [(y, x) for y in _positions(ch, th, g.overlap, s) for x in _positions(cw, tw, g.overlap, s)]
        if self.roi is not None:
            cells = self.roi_cells(Layout((h, w), (ch, cw), (), s))
            kept = [(y, x) for y, x in origins if cells[y // s:(y + th) // s, x // s:(x + tw) // s].any()]
            origins = kept or origins[:1]  # a frame always has an input, so it always gets a verdict
        return Layout((h, w), (ch, cw), tuple(origins), s)

    def decode_shrink(self, layout: Layout) -> int:
        """1, 2, 4 or 8: the JPEG frame of `layout` is decoded at 1/that of its size (calibration.images.shrunk),
        the most that still covers its canvas in both sides (1 with jpeg_decode "full")."""
        if self.geometry.jpeg_decode == "full":
            return 1
        for k in sorted(JPEG_SHRINKS, reverse=True):
            h, w = shrunk(layout.frame, k)
            if h >= layout.canvas[0] and w >= layout.canvas[1]:
                return k
        return 1

    def prepare(self, image: np.ndarray, layout: Layout, out: np.ndarray) -> None:
        """uint8 RGB [H, W, 3] (or grey [H, W, 1]) -> its inputs written into out[:layout.count] (uint8
        [>= T, h, w, 3]). The pixels are the frame of `layout` at its own size or decoded smaller
        (`decode_shrink`): they are resized to the canvas either way.

        Outside the ROI the inputs are mid-grey (ROI_FILL): what lies there cannot reach the scores
        inside through the network's receptive field, in fitting and in serving alike.
        """
        th, tw = self.spec.height, self.spec.width
        inside = None if self.roi is None else self._outside_free(layout.canvas)
        if self.geometry.tiling == "resize":
            canvas = _rgb_resize(image, th, tw, out=out[0])
        else:
            canvas = _rgb_resize(image, *layout.canvas)
            canvas = canvas.copy() if canvas is image else canvas
        if self.geometry.photometric == "frame":
            standardise(canvas, inside)
        if inside is not None:
            canvas[~inside] = ROI_FILL
        if self.geometry.tiling == "tiles":
            for k, (y, x) in enumerate(layout.origins):
                out[k] = canvas[y:y + th, x:x + tw]

    def canvas_image(self, image: np.ndarray, layout: Layout) -> np.ndarray:
        """The frame at canvas size for overlays: uint8 RGB [Hc, Wc, 3] as it came (not standardised),
        mid-grey outside the ROI."""
        canvas = _rgb_resize(image, *layout.canvas)
        if self.roi is not None:
            canvas = canvas.copy() if canvas is image else canvas
            canvas[~self._outside_free(layout.canvas)] = ROI_FILL
        return canvas

    def _outside_free(self, canvas: tuple[int, int]) -> np.ndarray:
        """bool [Hc, Wc]: the ROI at canvas pixels (cached per canvas size)."""
        if canvas not in self._roi_masks:
            self._roi_masks[canvas] = cv2.resize(self.roi, (canvas[1], canvas[0]), interpolation=cv2.INTER_NEAREST) > 0
        return self._roi_masks[canvas]

    def stitch(self, maps: np.ndarray, layout: Layout) -> np.ndarray:
        """Input maps float32 [T, h, w] -> the canvas map float32 [Hc/stride, Wc/stride], ROI applied."""
        if layout.count == 1 and maps.shape[1:] == layout.grid:
            canvas = np.array(maps[0], np.float32)
        else:
            gh, gw = layout.grid
            h, w = maps.shape[1:]
            weight = _edge_weights(h, w)
            total = np.zeros((gh, gw), np.float32)
            norm = np.zeros((gh, gw), np.float32)
            for m, (y, x) in zip(maps, layout.origins):
                cy, cx = y // self.stride, x // self.stride
                total[cy:cy + h, cx:cx + w] += m * weight
                norm[cy:cy + h, cx:cx + w] += weight
            canvas = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)
        if self.roi is not None:
            canvas *= self.roi_cells(layout)
        return canvas

    def roi_cells(self, layout: Layout) -> np.ndarray:
        """bool [Hc/stride, Wc/stride]: the canvas cells whose centre lies inside the ROI (all True without one)."""
        gh, gw = layout.grid
        if self.roi is None:
            return np.ones((gh, gw), bool)
        return cv2.resize(self.roi, (gw, gh), interpolation=cv2.INTER_NEAREST) > 0

    def roi_frame(self, frame: tuple[int, int]) -> np.ndarray | None:
        """bool [H0, W0] ROI at a frame's size (cached per size: a line's frames share one), or None without one."""
        if self.roi is None:
            return None
        size = (int(frame[0]), int(frame[1]))
        if size not in self._roi_frames:
            self._roi_frames[size] = cv2.resize(self.roi, size[::-1], interpolation=cv2.INTER_NEAREST) > 0
        return self._roi_frames[size]


def _rgb_resize(image: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """`resize` for RGB [H, W, 3] or grey [H, W, 1] pixels -> RGB [height, width, 3]: grey is resized in its
    one channel and widened after, which gives the pixels of widening first (each channel is resized on
    its own) at a fraction of the work: 9.2 against 22.3 ms for a 2448 x 2048 frame to 256 x 256
    (bench/results/prepare-grey.json)."""
    if image.shape[2] == 3:
        return resize(image, height, width, out=out)
    grey = np.ascontiguousarray(resize(image[:, :, 0], height, width))
    if out is None:
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB, dst=out)  # in place: the batch row
    return out


def standardise(canvas: np.ndarray, inside: np.ndarray | None = None) -> None:
    """uint8 [H, W, C] in place: one gain and offset for every channel, so the pixels (those `inside`,
    bool [H, W], when given) have mean STANDARD_MEAN and std STANDARD_STD, saturated to 0..255; the
    gain is at most STANDARD_STD / LEAST_STD."""
    mask = None if inside is None else inside.astype(np.uint8)
    means, stds = cv2.meanStdDev(canvas, mask=mask)  # per channel, [C, 1] float64 each
    mean = float(means.mean())
    std = float(np.sqrt(max((stds**2 + means**2).mean() - mean**2, 0.0)))  # all channels together
    gain = STANDARD_STD / max(std, LEAST_STD)
    lut = np.clip(np.rint((np.arange(256) - mean) * gain + STANDARD_MEAN), 0, 255).astype(np.uint8)
    cv2.LUT(canvas, lut, dst=canvas)


def _edge_weights(h: int, w: int) -> np.ndarray:
    """float32 [h, w]: 1 + the distance in cells to the nearest tile edge (a pyramid)."""
    y = np.minimum(np.arange(h), np.arange(h)[::-1]) + 1.0
    x = np.minimum(np.arange(w), np.arange(w)[::-1]) + 1.0
    return np.minimum.outer(y, x).astype(np.float32)


def input_for_frames(sizes: list[tuple[int, int]], area: int = 256 * 256, spread: float = 1.25) -> InputSpec:
    """A height x width input (multiples of 32) of about `area` pixels with the training frames' aspect
    ratio when they share one (the 90th and 10th percentile aspects within `spread` of each other:
    a fixed camera); frames of many shapes get a square input, no one aspect being theirs."""
    if not sizes:
        raise ConfigError("no frame sizes to choose an input from")
    aspects = np.array([w / h for h, w in sizes])
    lo, hi = np.percentile(aspects, [10, 90])
    aspect = float(np.median(aspects)) if hi / lo <= spread else 1.0
    height = math.sqrt(area / aspect)
    width = height * aspect
    return InputSpec(max(32, int(round(height / 32)) * 32), max(32, int(round(width / 32)) * 32))


def read_roi(spec: str, reference: tuple[int, int]) -> np.ndarray:
    """A region of interest from the command line: "x,y,w,h" in pixels of frames of size `reference`
    (H0, W0), or the path of a mask image (nonzero inside) -> uint8 mask."""
    from pathlib import Path

    parts = spec.split(",")
    if len(parts) == 4 and all(p.strip().lstrip("-").isdigit() for p in parts):
        x, y, w, h = (int(p) for p in parts)
        H, W = reference
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise ConfigError(f"roi {spec!r} is not a rectangle inside the {W}x{H} frames (x,y,w,h in pixels)")
        mask = np.zeros((H, W), np.uint8)
        mask[y:y + h, x:x + w] = 255
        return mask
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"roi {spec!r} is neither x,y,w,h in pixels nor a mask image file")
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None or not mask.any():
        raise ConfigError(f"roi mask {path} is unreadable or empty; give a grey PNG, nonzero inside the region")
    return mask
