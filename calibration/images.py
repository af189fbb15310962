"""Image decoding and pixel conversion, in one place: every reader (dataset, wire, camera) calls it.

Whatever comes in (an encoded file, grey, RGB, BGR, RGBA, 8 / 10 / 12 / 16-bit, a Bayer mosaic)
leaves as what every model takes: uint8 RGB [H, W, 3]. And the one image encoder lineguard has of its
own, `png_gray`, for the defect maps it writes at line rate.
"""

from __future__ import annotations

import struct
import urllib.parse
import zlib

import cv2
import numpy as np
from isal import isal_zlib

from engines.errors import LineguardError


class ImageError(LineguardError):
    """Pixels or an encoded image that cannot be turned into an RGB image."""


# GenICam / PFNC Bayer names (the colour at row 0, column 0 and its right neighbour) -> OpenCV
# conversion. OpenCV's older names count from the second row and column, hence the shift (checked
# against a synthetic mosaic in tests/test_images.py).
BAYER = {"RG": cv2.COLOR_BayerBG2RGB, "BG": cv2.COLOR_BayerRG2RGB, "GR": cv2.COLOR_BayerGB2RGB,
         "GB": cv2.COLOR_BayerGR2RGB}

# Defect maps (8-bit, frame size, data: lossless) are written at line rate by `png_gray`: every row
# filtered against the one above, deflated by ISA-L at level 1 (bench/png.py, bench/results/png-xeon.json).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Overlays are pictures for people (the frame with the heat blended over it): JPEG at quality 90,
# an order of magnitude faster to encode and several times smaller than the fastest PNG, at a PSNR
# recorded in bench/results/png.json. Every overlay writer (postprocess worker, eval --maps, the view)
# uses these two.
OVERLAY_SUFFIX = ".jpg"
OVERLAY_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 90]


def frame_file(stream: str, seq: int, suffix: str) -> str:
    """A streamed frame's file name (its defect map, its overlay): the stream name percent-encoded, so a
    name from the wire ("../x", "a/b") stays one file in its folder and two names never share a file."""
    return f"{urllib.parse.quote(stream, safe='')}-{seq:08d}{suffix}"


def overlay_file(stream: str, seq: int) -> str:
    """The file name of a streamed frame's overlay: what the postprocess worker writes and the view reads."""
    return frame_file(stream, seq, OVERLAY_SUFFIX)

# camera pixel formats (GenICam PFNC) this module converts: name -> (bits per sample, bayer pattern, channels)
PIXEL_FORMATS = {
    "Mono8": (8, None, 1), "Mono10": (10, None, 1), "Mono12": (12, None, 1), "Mono16": (16, None, 1),
    "RGB8": (8, None, 3), "BGR8": (8, None, 3),
    **{f"Bayer{p}{b}": (b, p, 1) for p in BAYER for b in (8, 10, 12, 16)},
}


def to_uint8(pixels: np.ndarray, bits: int = 16, name: str = "image") -> np.ndarray:
    """uint8 or uint16 array -> uint8, scaling uint16 by its real bit depth (8 to 16 significant bits;
    a sample above the depth saturates)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype != np.uint16:
        raise ImageError(f"{name}: pixel type {pixels.dtype} is not supported; use 8-, 10-, 12- or 16-bit images")
    if not 8 <= bits <= 16:
        raise ImageError(f"{name}: {bits} significant bits for 16-bit samples; expected 8 to 16")
    return np.minimum(pixels >> (bits - 8), 255).astype(np.uint8)


def significant_bits(high: int) -> int:
    """The bit depth (8 to 16) of 16-bit samples whose largest value is `high`: 12-bit camera data
    stored in 16-bit files reads 12, and is scaled by it rather than crushed to its top 4 bits."""
    return min(16, max(8, int(high).bit_length()))


def to_rgb(pixels: np.ndarray, name: str = "image", *, order: str = "RGB", bits: int | None = 16,
           bayer: str | None = None, keep_grey: bool = False) -> np.ndarray:
    """Any decoded array -> uint8 RGB [H, W, 3] (a new array, or `pixels` itself when it already is one).

    pixels: [H, W] or [H, W, 1 | 3 | 4], uint8 or uint16 (`bits` significant bits; None keeps 16-bit
    samples as they are, uint16 RGB, for the model that knows their depth); order: "RGB" or
    "BGR" (what OpenCV decodes to) for 3 and 4 channels; bayer: "RG" | "BG" | "GR" | "GB" for a
    single-channel mosaic (demosaiced after scaling to 8 bits). Grey is repeated, alpha dropped.
    keep_grey: grey stays uint8 [H, W, 1]; `Geometer.prepare` widens it after resizing (the same pixels
    as widening first, for a third of the work on a large frame).
    """
    if order not in ("RGB", "BGR"):
        raise ImageError(f"{name}: channel order {order!r}; expected RGB or BGR")
    image = np.asarray(pixels)
    if bits is not None or image.dtype != np.uint16:
        image = to_uint8(image, bits or 16, name)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2] if image.ndim == 3 else 0
    if bayer is not None:
        if bayer not in BAYER:
            raise ImageError(f"{name}: Bayer pattern {bayer!r}; expected one of {', '.join(BAYER)}")
        if channels != 1:
            raise ImageError(f"{name}: a Bayer mosaic has one channel, got shape {image.shape}")
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), BAYER[bayer])
    if channels == 1:
        return image if keep_grey else np.repeat(image, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if order == "BGR" else image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if order == "BGR" else cv2.COLOR_RGBA2RGB)
    raise ImageError(f"{name}: image has shape {image.shape}; expected grey, RGB or RGBA")


# A JPEG file can be decoded straight to 1/2, 1/4 or 1/8 of its size by libjpeg's scaled inverse DCT, at a
# fraction of a whole decode's time: a 2448 x 2048 frame becomes a 256 x 256 input in 6.0 ms at 1/8
# against 26.7 ms decoded whole and resized, 0.39 grey levels apart on average (bench/results/jpeg-decode.json).
# OpenCV's flags for each, colour and grey; EXIF orientation is ignored as IMREAD_UNCHANGED ignores it.
JPEG_SHRINKS = (2, 4, 8)
_REDUCED = {(2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
            (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8}


def is_jpeg(data: bytes | memoryview | np.ndarray) -> bool:
    return bytes(data[:2]) == b"\xff\xd8"


def png_bit_depth(data: bytes | memoryview | np.ndarray) -> int | None:
    """A png file's bits per sample (its IHDR chunk), without decoding; None for any other file."""
    if len(data) < 25 or bytes(data[:8]) != PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
        return None
    return int(data[24])


def shrunk(size: tuple[int, int], shrink: int) -> tuple[int, int]:
    """(H, W) of a JPEG of `size` decoded at 1/shrink: libjpeg rounds each side up."""
    return -(-int(size[0]) // shrink), -(-int(size[1]) // shrink)


def imdecode_flags(data: bytes | memoryview | np.ndarray, shrink: int = 1) -> tuple[int, int]:
    """(OpenCV imdecode flags, the shrink they apply) for an encoded file: a JPEG at 1/shrink (1, 2, 4 or 8;
    a grey JPEG stays grey), any other file whole and as it is stored (IMREAD_UNCHANGED)."""
    if shrink != 1 and shrink not in JPEG_SHRINKS:
        raise ValueError(f"a JPEG decodes at 1/1, 1/2, 1/4 or 1/8 of its size, not 1/{shrink}")
    if shrink > 1 and is_jpeg(data):
        grey = (file_shape(memoryview(data), "jpeg") or (0, 0, 3))[2] == 1
        return _REDUCED[shrink, grey] | cv2.IMREAD_IGNORE_ORIENTATION, shrink
    return cv2.IMREAD_UNCHANGED, 1


def decode(data: bytes | memoryview | np.ndarray, name: str = "image", shrink: int = 1,
           keep_grey: bool = False, bits: int | None = 16) -> np.ndarray:
    """An encoded file (png, jpeg, bmp, tiff ...) -> uint8 RGB [H, W, 3]; a 16-bit file is scaled by
    `bits` significant bits (the model's, `Geometry.bits`; None: kept 16-bit, `to_rgb`).
    shrink: a JPEG is decoded at 1/shrink of its size (`shrunk`); other files ignore it. keep_grey: a grey
    file comes as [H, W, 1] (`to_rgb`)."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    try:
        image = cv2.imdecode(buf, imdecode_flags(buf, shrink)[0]) if buf.size else None
    except cv2.error:
        image = None
    if image is None:
        raise ImageError(f"{name}: not a readable image (corrupt or unsupported format); replace or remove it")
    return to_rgb(image, name, order="BGR", keep_grey=keep_grey, bits=bits)


def from_pixel_format(buffer: np.ndarray, height: int, width: int, pixel_format: str,
                      name: str = "camera", keep_grey: bool = False) -> np.ndarray:
    """A camera buffer in a GenICam pixel format (PIXEL_FORMATS) -> uint8 RGB [H, W, 3] (a Mono format
    uint8 [H, W, 1] with keep_grey: a third of the bytes to send and to resize).

    buffer: the raw samples, uint8 for 8-bit formats, uint16 (or their bytes) for 10 / 12 / 16-bit
    unpacked formats, scaled by their real bit depth (a 12-bit sample of 4095 becomes 255).
    """
    if pixel_format not in PIXEL_FORMATS:
        raise ImageError(f"{name}: pixel format {pixel_format!r} is not supported; set the camera to one of "
                         f"{', '.join(PIXEL_FORMATS)}")
    bits, bayer, channels = PIXEL_FORMATS[pixel_format]
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    samples = np.frombuffer(np.ascontiguousarray(buffer), dtype)
    if samples.size != height * width * channels:
        raise ImageError(f"{name}: {pixel_format} buffer holds {samples.size} samples; {height}x{width}x{channels} "
                         f"needs {height * width * channels} (packed formats are not supported)")
    pixels = samples.reshape(height, width, channels)
    return to_rgb(pixels, name, order="BGR" if pixel_format == "BGR8" else "RGB", bits=bits, bayer=bayer,
                  keep_grey=keep_grey)


def resize(image: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3]: area filter when shrinking, bilinear when growing.

    out: an optional C-contiguous uint8 [height, width, 3] array written in place (e.g. a batch row).
    """
    if image.shape[:2] == (height, width):
        if out is None:
            return image
        out[...] = image
        return out
    shrink = image.shape[0] > height or image.shape[1] > width
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    if out is None:
        return cv2.resize(image, (width, height), interpolation=interpolation)
    cv2.resize(image, (width, height), dst=out, interpolation=interpolation)
    return out


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
def file_size(data: memoryview, encoding: str) -> tuple[int, int] | None:
    """(H, W) from a png IHDR chunk or a jpeg SOF segment, without decoding; None if there is none."""
    shape = file_shape(data, encoding)
    return None if shape is None else shape[:2]


def file_shape(data: memoryview, encoding: str) -> tuple[int, int, int] | None:
    """(H, W, channels) from a png IHDR chunk or a jpeg SOF segment, without decoding; None if there is
    none. channels: 1 for a grey file (png colour type grey or grey + alpha, a jpeg of one component),
    else 3 (what the file becomes: alpha dropped, colour as RGB).

    A png must also be whole: every chunk inside the data, up to IEND. OpenCV allocates a chunk's
    length before reading it, so one corrupted length byte in a 100-byte file costs gigabytes.
    """
    if encoding == "png":
        if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
            return None
        i = 8
        while i + 12 <= len(data):
            end = i + 12 + int.from_bytes(data[i:i + 4], "big")
            if end > len(data):
                return None
            if data[i + 4:i + 8] == b"IEND":
                return (int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"),
                        1 if data[25] in (0, 4) else 3)
            i = end
        return None
    i = _jpeg_frame_header(data)
    if i is None:
        return None
    return (int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"),
            1 if data[i + 9] == 1 else 3)


def _jpeg_frame_header(data) -> int | None:
    """The offset of a jpeg's frame header (SOF) marker, its sides and component count inside the data."""
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):  # walk the segments up to the frame header
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _JPEG_SOF:
            return i if i + 10 <= len(data) else None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def png_gray(image: np.ndarray) -> bytes:
    """uint8 [H, W] (H, W >= 1) -> the bytes of a lossless 8-bit greyscale PNG: each row stored as its
    difference from the row above (PNG filter "up"; smooth maps become runs of small values), deflated
    by ISA-L at level 1: 0.30x the time of OpenCV's fastest PNG setting at 1.13x its size
    (bench/results/png-xeon.json)."""
    if image.dtype != np.uint8 or image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"png_gray takes a non-empty uint8 [H, W] array, not {image.dtype} {list(image.shape)}")
    h, w = image.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 2  # filter "up": the first row's prior row is zeros, so it is stored as it is
    rows[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])  # modulo 256, as PNG defines it
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, greyscale, deflate, filters, no interlace
    return b"".join([PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", isal_zlib.compress(rows, 1)),
                     _png_chunk(b"IEND", b"")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
