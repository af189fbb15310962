"""Input geometry (calibration/geometry.py): resize and tile layouts, stitching, the ROI, the input choice."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration.geometry import (
    LEAST_STD,
    STANDARD_MEAN,
    STANDARD_STD,
    Geometer,
    Geometry,
    InputSpec,
    input_for_frames,
    read_roi,
    standardise,
)
from engines.errors import ConfigError

SPEC = InputSpec(64, 96)


def test_input_spec_validation():
    assert InputSpec(224, 320).shape == (224, 320, 3)
    for h, w in [(100, 64), (64, 16), (0, 64)]:
        with pytest.raises(ConfigError, match="multiple of 32"):
            InputSpec(h, w)
    with pytest.raises(ConfigError, match="NHWC"):
        InputSpec(64, 64, channels=1)


@pytest.mark.parametrize("kwargs, needle", [({"tiling": "mosaic"}, "tiling"), ({"scale": 0}, "scale"),
                                            ({"overlap": 1.0}, "overlap"), ({"photometric": "clahe"}, "photometric")])
def test_geometry_validation(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Geometry(**kwargs)


def test_resize_layout_is_one_input_of_the_model_size():
    g = Geometer(SPEC, Geometry(photometric="none"), stride=8)
    layout = g.layout((300, 700))
    assert layout.canvas == (64, 96) and layout.origins == ((0, 0),) and layout.grid == (8, 12)
    out = np.zeros((1, 64, 96, 3), np.uint8)
    image = np.full((300, 700, 3), 77, np.uint8)
    g.prepare(image, layout, out)
    assert np.all(out == 77)


@pytest.mark.parametrize("frame, scale", [((300, 700), 1.0), ((64, 96), 1.0), ((40, 50), 1.0), ((513, 1000), 0.5),
                                          ((1000, 130), 0.7)])
def test_tiles_cover_the_canvas_with_overlap(frame, scale):
    overlap = 0.25
    g = Geometer(SPEC, Geometry("tiles", scale, overlap), stride=8)
    layout = g.layout(frame)
    ch, cw = layout.canvas
    assert ch % 8 == 0 and cw % 8 == 0 and ch >= 64 and cw >= 96
    assert abs(ch - frame[0] * scale) <= 8 or ch == 64
    covered = np.zeros((ch, cw), bool)
    for y, x in layout.origins:
        assert y % 8 == 0 and x % 8 == 0 and y + 64 <= ch and x + 96 <= cw
        covered[y:y + 64, x:x + 96] = True
    assert covered.all()
    ys = sorted({y for y, _ in layout.origins})
    xs = sorted({x for _, x in layout.origins})
    assert all(b - a <= 64 * (1 - overlap) + 8 for a, b in zip(ys, ys[1:]))  # neighbours share >= overlap (to a cell)
    assert all(b - a <= 96 * (1 - overlap) + 8 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("photometric", ["none", "frame"])
def test_prepare_cuts_the_scaled_frame_into_its_tiles(photometric):
    g = Geometer(SPEC, Geometry("tiles", 1.0, photometric=photometric), stride=8)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    layout = g.layout(image.shape[:2])
    out = np.zeros((layout.count,) + SPEC.shape, np.uint8)
    g.prepare(image, layout, out)
    canvas = g.canvas_image(image, layout)  # as the frame came, for overlays
    assert canvas.shape[:2] == layout.canvas
    if photometric == "frame":  # one gain and offset for the whole canvas, so tiles of a frame agree
        canvas = canvas.copy()
        standardise(canvas)
    for tile, (y, x) in zip(out, layout.origins):
        np.testing.assert_array_equal(tile, canvas[y:y + 64, x:x + 96])


def test_stitch_puts_each_cell_back_and_blends_overlaps():
    g = Geometer(SPEC, Geometry("tiles", 1.0, 0.5), stride=8)
    layout = g.layout((64, 192))  # three tiles across: x = 0, 48, 96
    assert [x for _, x in layout.origins] == [0, 48, 96]
    # a constant map stitches to the same constant
    flat = g.stitch(np.full((3, 8, 12), 2.5, np.float32), layout)
    assert flat.shape == layout.grid == (8, 24) and np.allclose(flat, 2.5)
    # a hot cell of the middle tile lands at its canvas cell
    maps = np.zeros((3, 8, 12), np.float32)
    maps[1, 3, 5] = 9.0
    hot = g.stitch(maps, layout)
    assert np.unravel_index(hot.argmax(), hot.shape) == (3, 6 + 5)
    # where two tiles overlap, each counts by its distance to its own edge (1 + cells to the nearest edge)
    maps = np.stack([np.full((8, 12), float(i), np.float32) for i in range(3)])
    mixed = g.stitch(maps, layout)
    cx = 8  # canvas cell 8: tile 0 cell 8 (weight min(4, 4) = 4 rows aside, cols: min(9, 4) = 4) and tile 1 cell 2
    w0 = np.minimum(np.minimum(np.arange(8), np.arange(8)[::-1]) + 1, min(8, 12 - 1 - 8) + 1)
    w1 = np.minimum(np.minimum(np.arange(8), np.arange(8)[::-1]) + 1, min(2, 12 - 1 - 2) + 1)
    np.testing.assert_allclose(mixed[:, cx], (0 * w0 + 1 * w1) / (w0 + w1), rtol=1e-6)


def test_roi_drops_tiles_outside_it_and_zeroes_cells():
    roi = np.zeros((64, 192), np.uint8)
    roi[:, :60] = 255  # only the left third of the frame
    g = Geometer(SPEC, Geometry("tiles", 1.0, 0.5, photometric="none"), stride=8, roi=roi)
    layout = g.layout((64, 192))
    assert [x for _, x in layout.origins] == [0, 48]  # the tile at x = 96 sees nothing of the ROI
    cells = g.roi_cells(layout)
    assert cells[:, :7].all() and not cells[:, 8:].any()
    stitched = g.stitch(np.ones((2, 8, 12), np.float32), layout)
    assert np.all(stitched[:, :7] == 1) and np.all(stitched[:, 8:] == 0)
    tiles = np.zeros((layout.count,) + SPEC.shape, np.uint8)
    g.prepare(np.full((64, 192, 3), 250, np.uint8), layout, tiles)
    assert np.all(tiles[0][:, :56] == 250) and np.all(tiles[1][:, 16:] == 127)  # mid-grey outside the ROI
    frame_roi = g.roi_frame((32, 96))  # a frame of another size: the mask is scaled to it
    assert frame_roi.shape == (32, 96) and frame_roi[:, :29].all() and not frame_roi[:, 31:].any()


def test_resize_layout_with_roi_keeps_its_input():
    roi = np.zeros((10, 10), np.uint8)
    roi[2:5, 2:5] = 1
    g = Geometer(SPEC, Geometry(), stride=8, roi=roi)
    layout = g.layout((100, 100))
    assert layout.count == 1
    stitched = g.stitch(np.ones((1, 8, 12), np.float32), layout)
    assert 0 < stitched.sum() < stitched.size


def _stats(pixels: np.ndarray) -> tuple[float, float]:
    return float(pixels.astype(np.float64).mean()), float(pixels.astype(np.float64).std())


def test_standardise_reaches_the_target_and_bounds_the_gain():
    rng = np.random.default_rng(0)
    image = rng.integers(30, 91, (80, 120, 3), dtype=np.uint8)  # mean 60, std 17.6: no pixel saturates
    standardise(image)
    mean, std = _stats(image)
    assert abs(mean - STANDARD_MEAN) < 0.5 and abs(std - STANDARD_STD) < 0.5
    flat = rng.integers(100, 104, (80, 120, 3), dtype=np.uint8)  # std 1.1: the gain stops at 64 / 8
    before = _stats(flat)[1]
    standardise(flat)
    assert abs(_stats(flat)[0] - STANDARD_MEAN) < 1.0
    assert _stats(flat)[1] == pytest.approx(before * STANDARD_STD / LEAST_STD, rel=0.05)


def test_photometric_frame_sees_one_frame_at_any_exposure():
    """The same scene darker and at half the contrast gives the network (nearly) the same input."""
    rng = np.random.default_rng(1)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (120, 180, 3), dtype=np.uint8), (0, 0), 2).astype(np.float32)
    scene = np.clip((texture - texture.mean()) * 4 + 128, 0, 255).astype(np.uint8)  # std about 40
    dim = np.clip(scene * 0.5 + 20, 0, 255).astype(np.uint8)
    inputs = {}
    for photometric in ("frame", "none"):
        g = Geometer(SPEC, Geometry(photometric=photometric), stride=8)
        pair = np.zeros((2,) + SPEC.shape, np.uint8)
        for k, image in enumerate((scene, dim)):
            g.prepare(image, g.layout(image.shape[:2]), pair[k:k + 1])
        inputs[photometric] = np.abs(pair[0].astype(int) - pair[1].astype(int))
    assert inputs["frame"].mean() < 1.5 and inputs["frame"].max() <= 8  # the rounding of the dim copy
    assert inputs["none"].mean() > 10  # without it the network sees two different frames


def test_photometric_statistics_come_from_inside_the_roi():
    roi = np.zeros((64, 96), np.uint8)
    roi[:, :48] = 255
    rng = np.random.default_rng(2)
    image = np.full((64, 96, 3), 255, np.uint8)
    image[:, :48] = rng.integers(30, 91, (64, 48, 3))  # outside: white, which must not darken the inside
    g = Geometer(SPEC, Geometry(), stride=8, roi=roi)
    out = np.zeros((1,) + SPEC.shape, np.uint8)
    g.prepare(image, g.layout((64, 96)), out)
    mean, std = _stats(out[0][:, :48])
    assert abs(mean - STANDARD_MEAN) < 0.5 and abs(std - STANDARD_STD) < 0.5
    assert np.all(out[0][:, 48:] == 127)


def test_input_for_frames_follows_a_shared_aspect_ratio():
    assert input_for_frames([(512, 512)] * 3).shape == (256, 256, 3)
    spec = input_for_frames([(300, 700), (310, 690), (305, 700), (300, 720)])
    assert spec.width > spec.height and spec.height % 32 == 0 and spec.width % 32 == 0
    assert abs(spec.width / spec.height - 700 / 300) < 0.35
    assert spec.height * spec.width == pytest.approx(256 * 256, rel=0.15)
    tall = input_for_frames([(1240, 500)])
    assert tall.height > tall.width
    # frames of many shapes (crops of varying aspect): a square input
    assert input_for_frames([(300, 700), (500, 100), (300, 300), (200, 400)]).shape == (256, 256, 3)


def test_read_roi_rectangle_mask_and_errors(tmp_path):
    mask = read_roi("10,5,20,8", (40, 60))
    assert mask.shape == (40, 60) and mask[5:13, 10:30].all() and mask.sum() == 255 * 20 * 8
    path = tmp_path / "roi.png"
    drawn = np.zeros((30, 30), np.uint8)
    cv2.circle(drawn, (15, 15), 8, 255, -1)
    cv2.imwrite(str(path), drawn)
    np.testing.assert_array_equal(read_roi(str(path), (40, 60)), drawn)
    for bad in ("10,5,20", "50,5,20,8", "1,1,0,5"):
        with pytest.raises(ConfigError, match="roi"):
            read_roi(bad, (40, 60))
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match="empty"):
        read_roi(str(tmp_path / "empty.png"), (40, 60))


@pytest.mark.parametrize("frame, geometry, spec, shrink", [
    ((2048, 2448), Geometry(), InputSpec(256, 256), 8),  # a 5-megapixel camera: 256 x 306 still covers 256 x 256
    ((512, 512), Geometry(), InputSpec(256, 256), 2),
    ((511, 512), Geometry(), InputSpec(256, 256), 2),  # 1/2 rounds up: 256 x 256
    ((510, 512), Geometry(), InputSpec(256, 256), 1),  # 255 rows would not cover the input
    ((1000, 1500), Geometry(), InputSpec(224, 320), 4),  # the input follows the frames' aspect
    ((2048, 2448), Geometry(jpeg_decode="full"), InputSpec(256, 256), 1),
    ((1024, 1024), Geometry("tiles", 0.5), InputSpec(256, 256), 2),  # the canvas is half the frame
    ((1024, 1024), Geometry("tiles", 1.0), InputSpec(256, 256), 1),  # tiles at frame pixels: no reduction
])
def test_decode_shrink_is_the_most_that_still_covers_the_canvas(frame, geometry, spec, shrink):
    geometer = Geometer(spec, geometry, stride=8)
    layout = geometer.layout(frame)
    assert geometer.decode_shrink(layout) == shrink
    h, w = -(-frame[0] // shrink), -(-frame[1] // shrink)
    assert h >= layout.canvas[0] and w >= layout.canvas[1]
    if shrink < 8 and geometry.jpeg_decode == "scaled":  # twice the reduction would not cover it
        assert -(-frame[0] // (2 * shrink)) < layout.canvas[0] or -(-frame[1] // (2 * shrink)) < layout.canvas[1]


def test_geometry_refuses_an_unknown_jpeg_decoding():
    with pytest.raises(ConfigError, match="JPEG decoding"):
        Geometry(jpeg_decode="fast")


@pytest.mark.parametrize("geometry", [Geometry(), Geometry("tiles", 0.75), Geometry(photometric="none")])
@pytest.mark.parametrize("frame", [(300, 410), (40, 50)])  # shrinking (area) and growing (bilinear)
def test_grey_pixels_give_the_inputs_of_their_rgb(geometry, frame):
    """A grey frame [H, W, 1] is resized in one channel and widened after: exactly the inputs and canvas of
    its RGB repetition, which fit made."""
    rng = np.random.default_rng(5)
    grey = cv2.GaussianBlur(rng.integers(0, 256, frame, dtype=np.uint8), (0, 0), 1.5)[:, :, None]
    roi = np.zeros((60, 80), np.uint8)
    roi[10:50, 5:70] = 255
    g = Geometer(SPEC, geometry, stride=8, roi=roi)
    layout = g.layout(frame)
    got = np.empty((layout.count,) + SPEC.shape, np.uint8)
    want = np.empty_like(got)
    g.prepare(grey, layout, got)
    g.prepare(np.repeat(grey, 3, axis=2), layout, want)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g.canvas_image(grey, layout), g.canvas_image(np.repeat(grey, 3, axis=2), layout))


def test_fit_reports_what_a_map_cell_covers_and_the_tiles_that_halve_it():
    """A 2048 x 2448 camera frame resized to 256 x 320: a cell covers 64 frame pixels, more than FINE_CELL,
    so fit names the tile scale whose cells cover 32 (and what that costs in inputs); a 256-pixel frame
    has cells of 8 and no suggestion."""
    from calibration.fit import FINE_CELL, resolution

    resize = Geometer(InputSpec(256, 320), Geometry(), 8)
    camera = resolution(resize, (2048, 2448))
    assert camera["cell_pixels"] == pytest.approx(2048 / 32) and camera["cell_pixels"] > FINE_CELL
    assert camera["inputs_per_frame"] == 1
    finer = camera["finer"]
    tiles = Geometer(InputSpec(256, 320), Geometry(tiling="tiles", scale=finer["tile_scale"]), 8)
    layout = tiles.layout((2048, 2448))
    assert max(2048 / layout.grid[0], 2448 / layout.grid[1]) == pytest.approx(camera["cell_pixels"] / 2, rel=0.02)
    assert finer["inputs_per_frame"] == layout.count > 1
    assert resolution(resize, (256, 320)) == {"cell_pixels": 8.0, "inputs_per_frame": 1}
    assert "finer" not in resolution(tiles, (2048, 2448))  # already tiled: the user chose the scale
    roi = np.zeros((2048, 2448), np.uint8)
    roi[:512, :612] = 255  # a region in one corner: the tiles that cover it are all the inputs
    inside = resolution(Geometer(InputSpec(256, 320), Geometry(), 8, roi), (2048, 2448))["finer"]
    assert inside["tile_scale"] == finer["tile_scale"] and 1 <= inside["inputs_per_frame"] < finer["inputs_per_frame"]
