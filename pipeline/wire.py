"""Wire format version 1: lineguard's messages as pure encode / decode functions.

Every message is a ZeroMQ multipart message. Frame 0 is the header, a msgpack map of at most
MAX_HEADER_BYTES; the frames after it are raw buffers. There is no pickle anywhere.

    frame   {"v": 1, "kind": "frame", "stream", "seq", "t_ns", "shape": [H, W, C], "dtype",
             "encoding", "product", "meta", "error" (optional: the source could not read it)}
                                                                    + exactly 1 payload frame
    result  {"v": 1, "kind": "result", "stream", "seq", "t_ns", "verdict", "score", "regions",
             "timing", "error", "map_shape": [H, W] (optional), "meta" (optional: the frame's meta)}
                                                                    + a uint8 defect map iff map_shape
    eos     {"v": 1, "kind": "eos", "stream", "count", "dropped"}   no payload
    scored  {"v": 1, "kind": "scored", "stream", "seq", "t_ns", "shape", "product", "meta", "score",
             "grid": [h, w], "canvas": [Hc, Wc] (optional), "heat": [Hc, Wc] (optional), "timing"}
                                    + float32 anomaly map [h, w] (+ uint8 RGB canvas [Hc, Wc, 3] iff
                                    "canvas": the frame as the model saw it, for overlays) (+ uint8
                                    heat [Hc, Wc] iff "heat": the normalised smoothed map x 255, made
                                    on the GPU) (inference worker -> postprocess worker)
    control {"v": 1, "kind": "control", "event": "ready" | "stats" | "status", "role", "name", "data"}
                                    no payload (stages -> the supervisor of a run)
    ack     {"v": 1, "kind": "ack", "stream", "next", "missing": [seq, ...], "done"(, "held": [seq, ...])}
                                    no payload (sink -> producers: every seq below "next" but those
                                    in "missing" has its verdict logged; "done": the stream is whole;
                                    "held": seqs whose results the sink holds in memory, unlogged,
                                    waiting behind a gap)

Send what the encoders return with ``sock.send_multipart(frames, copy=False)`` and hand what
``sock.recv_multipart(copy=False)`` returns to :func:`decode`; raw pixels and defect maps are then
copied by neither side (pyzmq still copies frames smaller than its ``copy_threshold``).

Conventions: pixels are [H, W, C] with C = 1 (grey), 3 (RGB) or 4 (RGBA); uint16 is little-endian
on the wire; ``t_ns`` is ``time.time_ns()`` of the producer (wall clock, so it compares across hosts)
and a result carries the t_ns of its frame. A header field the version does not define is rejected
(extensions go in "meta"). Anything malformed or hostile raises :class:`WireError` with a short
``reason`` code (TypeError only for a frame that is not a buffer at all), and allocates no more
than the header declares, within MAX_HEADER_BYTES, MAX_SIDE and MAX_PIXELS.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import msgpack
import numpy as np
import zmq

from calibration import images
from engines.errors import LineguardError

VERSION = 1
MAX_HEADER_BYTES = 65536  # a larger header is rejected before msgpack parses it
MAX_SIDE = 16384  # per image or defect-map dimension
MAX_PIXELS = 1 << 26  # per image (67 megapixels): a small file claiming more (a decompression bomb) is refused
MAX_CHANNELS = 4

DTYPES = ("uint8", "uint16")
_DTYPE_NAMES = {"B": "uint8", "H": "uint16"}
ENCODINGS = ("raw", "jpeg", "png")
VERDICTS = ("ok", "defect", "error")
REASONS = ("frame_count", "header_too_large", "not_msgpack", "bad_version", "bad_kind", "bad_field",
           "bad_shape", "bad_dtype", "bad_encoding", "payload_size", "bad_payload")

_UINT64 = 2**64 - 1
_FRAME_FIELDS = {"v", "kind", "stream", "seq", "t_ns", "shape", "dtype", "encoding", "product", "meta", "error"}
_RESULT_FIELDS = {"v", "kind", "stream", "seq", "t_ns", "verdict", "score", "regions", "timing", "error",
                  "map_shape", "meta"}
_EOS_FIELDS = {"v", "kind", "stream", "count", "dropped"}
_SCORED_FIELDS = {"v", "kind", "stream", "seq", "t_ns", "shape", "product", "meta", "score", "grid", "canvas",
                  "heat", "timing"}
_CONTROL_FIELDS = {"v", "kind", "event", "role", "name", "data"}
_ACK_REQUIRED = {"v", "kind", "stream", "next", "missing", "done"}
_ACK_FIELDS = _ACK_REQUIRED | {"held"}
MAX_ACK_MISSING = 4096
CONTROL_EVENTS = ("ready", "stats", "status")
_UNPACK_LIMITS = dict(max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES, max_ext_len=MAX_HEADER_BYTES,
                      max_array_len=MAX_HEADER_BYTES, max_map_len=MAX_HEADER_BYTES // 2)


class WireError(LineguardError):
    """A message that is not version-1 wire format, or an argument an encoder cannot send.

    ``reason`` is one of REASONS, for counting rejections. ``stream``, ``seq`` and ``t_ns`` are those
    of the rejected message when its header decoded far enough to know them, else None: a worker
    answers such a frame with an error :class:`Result` instead of dropping it.
    """

    def __init__(self, reason: str, message: str, *, stream: str | None = None, seq: int | None = None,
                 t_ns: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.stream = stream
        self.seq = seq
        self.t_ns = t_ns

    def __reduce__(self):  # keep the attributes across processes
        return type(self), (self.reason, str(self)), {"stream": self.stream, "seq": self.seq, "t_ns": self.t_ns}


# ---- field checks, shared by the encoders (arguments) and decode (received headers) ----

def _show(x: Any) -> str:
    """repr of a received value, cut short: a hostile header must not make a 60 kB log line."""
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(x: Any) -> bool:  # numpy integers are accepted from encoders; decoded headers hold Python ints
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _int(name: str, x: Any, lo: int = 0, hi: int = _UINT64) -> int:
    if not _is_int(x) or not lo <= x <= hi:
        raise WireError("bad_field", f"{name} must be an int in [{lo}, {hi}], got {_show(x)}")
    return int(x)


def _str(name: str, x: Any, optional: bool = False) -> str | None:
    if x is None and optional:
        return None
    if not isinstance(x, str) or not x:
        raise WireError("bad_field", f"{name} must be a non-empty str{' or None' if optional else ''}, got {_show(x)}")
    return x


def _float(name: str, x: Any, optional: bool = False) -> float | None:
    if x is None and optional:
        return None
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        raise WireError("bad_field", f"{name} must be a float{' or None' if optional else ''}, got {_show(x)}")
    return float(x)


def _str_map(name: str, x: Any) -> None:
    if not isinstance(x, dict) or not all(isinstance(k, str) for k in x):
        raise WireError("bad_field", f"{name} must be a map with str keys, got {_show(x)}")


def _sides(name: str, x: Any, n: int) -> tuple[int, ...]:
    if not isinstance(x, (list, tuple)) or len(x) != n or not all(_is_int(s) and s > 0 for s in x):
        form = "[H, W, C]" if n == 3 else "[H, W]"
        raise WireError("bad_shape", f"{name} must be {form}: {n} positive ints, got {_show(x)}")
    if x[0] > MAX_SIDE or x[1] > MAX_SIDE:
        raise WireError("bad_shape", f"{name} {list(x)} has a side over MAX_SIDE = {MAX_SIDE}")
    return tuple(int(s) for s in x)


def _image_shape(x: Any) -> tuple[int, int, int]:
    shape = _sides("shape", x, 3)
    if shape[2] not in (1, 3, MAX_CHANNELS):
        raise WireError("bad_shape", f"shape {list(shape)} has {shape[2]} channels; expected 1, 3 or 4")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise WireError("bad_shape", f"shape {list(shape)} has {shape[0] * shape[1]} pixels, over MAX_PIXELS = "
                                     f"{MAX_PIXELS}")
    return shape  # type: ignore[return-value]


def _keys(kind: str, header: dict, allowed: set[str], required: set[str]) -> None:
    missing = sorted(required - header.keys())
    if missing:
        raise WireError("bad_field", f"{kind} header has no {missing} field(s); a {kind} header has {sorted(allowed)}")
    unknown = sorted(map(str, header.keys() - allowed))
    if unknown:
        raise WireError("bad_field", f"{kind} header has unknown field(s) {_show(unknown)}; version {VERSION} "
                                     f"defines {sorted(allowed)} (put extensions in 'meta')")


def _bytes_view(x: Any) -> memoryview:
    """A flat byte memoryview over a message frame, without copying it."""
    if isinstance(x, zmq.Frame):
        x = x.buffer
    try:
        view = memoryview(x)
        return view if view.ndim == 1 and view.format == "B" else view.cast("B")
    except TypeError as e:
        raise TypeError(f"a message frame must be bytes, a memoryview or a zmq.Frame (C-contiguous); "
                        f"got {type(x).__name__}: {e}") from None


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass in __post_init__


def _pack(header: dict) -> bytes:
    try:
        data = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, msgpack.PackException) as e:
        raise WireError("bad_field", f"header is not msgpack-serialisable ({e}); meta values must be "
                                     f"None, bool, int, float, str, bytes, lists or maps of them") from None
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("header_too_large", f"header is {len(data)} bytes; the limit is MAX_HEADER_BYTES = "
                                            f"{MAX_HEADER_BYTES} (keep meta small, send data as payload)")
    return data


# ---- messages ----

@dataclass(frozen=True)
class Frame:
    """One image of a stream. Built by :func:`decode`; send one with :func:`encode_frame`.

    shape is [H, W, C] (C = 1, 3 or 4; RGB / RGBA order), dtype "uint8" or "uint16". ``error``: set by
    a producer that could not read this frame from its source (the frame still gets a result: an
    error). ``meta`` is the user's, only echoed. ``payload`` is a
    flat byte view into the received message buffer (it keeps that buffer alive): raw pixels, or the
    encoded jpeg / png file. A raw payload is H*W*C*itemsize bytes (checked on construction); an
    encoded one is checked against shape and dtype only by :meth:`image`.
    """

    kind: ClassVar[str] = "frame"
    stream: str
    seq: int
    t_ns: int
    shape: tuple[int, int, int]
    dtype: str
    encoding: str
    payload: memoryview = field(repr=False)
    product: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self):
        _str("stream", self.stream)
        _set(self, "seq", _int("seq", self.seq))
        _set(self, "t_ns", _int("t_ns", self.t_ns))
        _str("error", self.error, optional=True)
        _set(self, "shape", _image_shape(self.shape))
        if self.dtype not in DTYPES:
            raise WireError("bad_dtype", f"dtype {_show(self.dtype)} is not one of {list(DTYPES)}")
        _set(self, "dtype", np.dtype(self.dtype).name)  # a str even when given np.dtype("uint8")
        if self.encoding not in ENCODINGS:
            raise WireError("bad_encoding", f"encoding {_show(self.encoding)} is not one of {list(ENCODINGS)}")
        _str("product", self.product, optional=True)
        _str_map("meta", self.meta)
        _set(self, "payload", _bytes_view(self.payload))
        if self.encoding == "raw":
            h, w, c = self.shape
            itemsize = np.dtype(self.dtype).itemsize
            if len(self.payload) != h * w * c * itemsize:
                raise WireError("payload_size", f"raw payload is {len(self.payload)} bytes; shape {list(self.shape)} "
                                                f"{self.dtype} needs {h}*{w}*{c}*{itemsize} = {h * w * c * itemsize}")

    def image(self, shrink: int = 1) -> np.ndarray:
        """The pixels: a read-only array of ``shape`` and ``dtype``, channels RGB / RGBA.

        raw: a zero-copy view into the received buffer (``.copy()`` it to keep or modify it).
        jpeg / png: decoded now by OpenCV (IMREAD_UNCHANGED, so no EXIF rotation) into a new array,
        converted to the header's channel count (BGR -> RGB, grey <-> colour). The file's own width
        and height are read first, so a small file claiming a huge image is refused before decoding.
        shrink: a jpeg is decoded at 1/shrink (2, 4 or 8) of ``shape``'s sides, rounded up
        (calibration.images.shrunk); raw and png frames come whole.
        Raises WireError("bad_payload") if the file does not decode to ``shape`` and ``dtype``.
        """
        if self.encoding == "raw":
            array = np.frombuffer(self.payload, np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)
        else:
            try:
                array = _decode_file(self.payload, self.encoding, self.shape, self.dtype, shrink)
            except WireError as e:
                e.stream, e.seq, e.t_ns = self.stream, self.seq, self.t_ns
                raise
        array.flags.writeable = False
        return array


@dataclass(frozen=True)
class Region:
    """One defect region: bbox (x, y, w, h) and area in pixels of the frame, and its score."""

    bbox: tuple[int, int, int, int]
    area: int
    score: float

    def __post_init__(self):
        if not isinstance(self.bbox, (list, tuple, np.ndarray)) or len(self.bbox) != 4 or not all(
                _is_int(v) and 0 <= v <= _UINT64 for v in self.bbox):
            raise WireError("bad_field", f"region bbox must be [x, y, w, h]: 4 non-negative ints, "
                                         f"got {_show(self.bbox)}")
        _set(self, "bbox", tuple(int(v) for v in self.bbox))
        _set(self, "area", _int("region area", self.area))
        _set(self, "score", _float("region score", self.score))


@dataclass(frozen=True, eq=False)
class Result:
    """The answer to one frame: verdict "ok" | "defect" | "error", score, regions, per-stage timing in ms.

    ``t_ns`` is the frame's t_ns (end-to-end latency = now - t_ns). ``error`` is required for the
    "error" verdict. ``defect_map`` is None or a uint8 [H, W] array; a decoded one is a read-only
    view into the received buffer. Equality compares every field, maps by value.
    """

    kind: ClassVar[str] = "result"
    stream: str
    seq: int
    t_ns: int
    verdict: str
    score: float | None = None
    regions: tuple[Region, ...] = ()
    timing: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    defect_map: np.ndarray | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _str("stream", self.stream)
        _set(self, "seq", _int("seq", self.seq))
        _set(self, "t_ns", _int("t_ns", self.t_ns))
        if self.verdict not in VERDICTS:
            raise WireError("bad_field", f"verdict {_show(self.verdict)} is not one of {list(VERDICTS)}")
        _set(self, "score", _float("score", self.score, optional=True))
        if not isinstance(self.regions, (list, tuple)) or not all(isinstance(r, Region) for r in self.regions):
            raise WireError("bad_field", f"regions must be a sequence of Region, got {_show(self.regions)}")
        _set(self, "regions", tuple(self.regions))
        if not isinstance(self.timing, dict):
            raise WireError("bad_field", f"timing must be a map of stage name -> ms, got {_show(self.timing)}")
        _set(self, "timing", {_str("timing stage", k): _float(f"timing[{k!r}]", v) for k, v in self.timing.items()})
        _str("error", self.error, optional=self.verdict != "error")
        _str_map("meta", self.meta)
        m = self.defect_map
        if m is not None:
            if not isinstance(m, np.ndarray) or m.dtype != np.uint8:
                raise WireError("bad_dtype", f"defect_map must be a uint8 numpy array, got "
                                             f"{getattr(m, 'dtype', type(m).__name__)}")
            _sides("defect_map shape", m.shape, 2)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        names = [f.name for f in dataclasses.fields(self) if f.name != "defect_map"]
        if any(getattr(self, n) != getattr(other, n) for n in names):
            return False
        a, b = self.defect_map, other.defect_map
        return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


@dataclass(frozen=True)
class Eos:
    """End of stream: the producer sent ``count`` frames on ``stream`` (seq 0 .. count - 1) and
    dropped ``dropped`` more before sending (live sources only)."""

    kind: ClassVar[str] = "eos"
    stream: str
    count: int
    dropped: int = 0

    def __post_init__(self):
        _str("stream", self.stream)
        _set(self, "count", _int("count", self.count))
        _set(self, "dropped", _int("dropped", self.dropped))


@dataclass(frozen=True, eq=False)
class Scored:
    """A frame's anomaly map, from an inference worker to a postprocess worker.

    stream, seq, t_ns, shape ([H, W, C] of the original frame), product, meta: the frame's;
    score: the raw image score; grid_map: float32 [h, w], the raw canvas map (one cell per
    stride canvas pixels); image: None, or the uint8 RGB canvas [Hc, Wc, 3] the map belongs to
    (sent for defective frames, to draw overlays on: the original is not sent again); both are
    read-only views into the received buffers once decoded. heat: None, or the uint8 [Hc, Wc]
    normalised smoothed map x 255 (the GPU path makes it on the device). timing: per-stage ms so far.
    """

    kind: ClassVar[str] = "scored"
    stream: str
    seq: int
    t_ns: int
    shape: tuple[int, int, int]
    score: float
    grid_map: np.ndarray = field(repr=False)
    image: np.ndarray | None = field(default=None, repr=False)
    timing: dict[str, float] = field(default_factory=dict)
    product: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    heat: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        _str("stream", self.stream)
        _set(self, "seq", _int("seq", self.seq))
        _set(self, "t_ns", _int("t_ns", self.t_ns))
        _set(self, "shape", _image_shape(self.shape))
        _str("product", self.product, optional=True)
        _str_map("meta", self.meta)
        im = self.image
        if im is not None and (not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3
                               or im.shape[2] != 3):
            raise WireError("bad_shape", f"image must be None or a uint8 [H, W, 3] array, got "
                                         f"{getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
        _set(self, "score", _float("score", self.score))
        m = self.grid_map
        if not isinstance(m, np.ndarray) or m.dtype != np.float32:
            raise WireError("bad_dtype", f"grid_map must be a float32 numpy array, got "
                                         f"{getattr(m, 'dtype', type(m).__name__)}")
        _sides("grid", m.shape, 2)
        heat = self.heat
        if heat is not None and (not isinstance(heat, np.ndarray) or heat.dtype != np.uint8 or heat.ndim != 2):
            raise WireError("bad_dtype", f"heat must be None or a uint8 [H, W] array, got "
                                         f"{getattr(heat, 'dtype', type(heat).__name__)}")
        if not isinstance(self.timing, dict):
            raise WireError("bad_field", f"timing must be a map of stage name -> ms, got {_show(self.timing)}")
        _set(self, "timing", {_str("timing stage", k): _float(f"timing[{k!r}]", v) for k, v in self.timing.items()})


@dataclass(frozen=True)
class Control:
    """A stage's report to the supervisor of a run: event "ready", "stats" or "status" with a data map."""

    kind: ClassVar[str] = "control"
    event: str
    role: str
    name: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.event not in CONTROL_EVENTS:
            raise WireError("bad_field", f"control event {_show(self.event)} is not one of {list(CONTROL_EVENTS)}")
        _str("role", self.role)
        _str("name", self.name)
        _str_map("control data", self.data)


@dataclass(frozen=True)
class Ack:
    """The sink's acknowledgement of one stream: every seq below ``next`` except those in ``missing``
    has its verdict released (logged); ``done``: the stream has ended and every seq has one.
    ``held``: seqs at or above ``next`` whose results the sink holds in memory, not logged (waiting
    behind a gap): the producer keeps them, since a killed sink loses them, but need not send them
    again while the sink says it holds them. Acks are cumulative and idempotent, so a lost one is
    made good by the next."""

    kind: ClassVar[str] = "ack"
    stream: str
    next: int
    missing: tuple[int, ...] = ()
    done: bool = False
    held: tuple[int, ...] = ()

    def __post_init__(self):
        _str("stream", self.stream)
        _set(self, "next", _int("next", self.next))
        if not isinstance(self.missing, (list, tuple)) or len(self.missing) > MAX_ACK_MISSING:
            raise WireError("bad_field", f"missing must be a list of at most {MAX_ACK_MISSING} seqs")
        _set(self, "missing", tuple(_int("missing seq", m, 0, self.next) for m in self.missing))
        if not isinstance(self.done, bool):
            raise WireError("bad_field", f"done must be a bool, got {_show(self.done)}")
        if not isinstance(self.held, (list, tuple)) or len(self.held) > MAX_ACK_MISSING:
            raise WireError("bad_field", f"held must be a list of at most {MAX_ACK_MISSING} seqs")
        _set(self, "held", tuple(_int("held seq", h, self.next) for h in self.held))

    def covers(self, seq: int) -> bool:
        """Whether `seq` has its verdict (and may be forgotten by the producer)."""
        return seq < self.next and seq not in self.missing


# ---- encoders: return the list of frames for send_multipart(frames, copy=False) ----

def encode_frame(stream: str, seq: int, image: np.ndarray, *, t_ns: int | None = None, product: str | None = None,
                 meta: dict[str, Any] | None = None, error: str | None = None) -> list:
    """A raw frame: [header bytes, payload]. error: why the source could not read it (the frame then
    ends as an error result; send a 1x1 image).

    image: uint8 or uint16 [H, W, C] (C = 1, 3 or 4, RGB / RGBA order) or [H, W] (sent as C = 1).
    The payload is a memoryview of ``image`` itself, no copy, when it is C-contiguous and (uint16)
    little-endian; otherwise it is a contiguous little-endian copy. Do not write to ``image`` until
    the message has been sent (pyzmq sends copy=False frames later, from its I/O thread; pass
    track=True to send_multipart to know when). t_ns defaults to time.time_ns().
    """
    if not isinstance(image, np.ndarray):
        raise WireError("bad_field", f"image must be a numpy array, got {type(image).__name__}")
    dtype = _DTYPE_NAMES.get(image.dtype.char)  # dtype.name is a slow Python property
    if dtype is None:
        raise WireError("bad_dtype", f"image dtype is {image.dtype}; expected one of {list(DTYPES)} "
                                     f"(convert with .astype, e.g. np.uint8)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise WireError("bad_shape", f"image has shape {list(image.shape)}; expected [H, W, C] or [H, W]")
    _image_shape(image.shape)  # before taking a view: an empty array has none
    image = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
    frame = Frame(stream, seq, _now(t_ns), image.shape, dtype, "raw", _flat(image), product,
                  {} if meta is None else meta, error)
    return [_pack(_frame_header(frame)), frame.payload]


def encode_frame_encoded(stream: str, seq: int, data: bytes | memoryview, shape: Sequence[int], encoding: str, *,
                         dtype: str = "uint8", t_ns: int | None = None, product: str | None = None,
                         meta: dict[str, Any] | None = None) -> list:
    """An encoded frame: [header bytes, data], ``data`` (a jpeg or png file) sent as is, without copying.

    shape [H, W, C] and dtype ("uint16" for a 16-bit png) are what the file decodes to after
    conversion to C channels; they are checked by the receiver's :meth:`Frame.image`, not here.
    """
    if encoding not in ("jpeg", "png"):
        raise WireError("bad_encoding", f"encoding {_show(encoding)} is not 'jpeg' or 'png' "
                                        f"(send raw pixels with encode_frame)")
    frame = Frame(stream, seq, _now(t_ns), shape, dtype, encoding, data, product, {} if meta is None else meta)
    if not len(frame.payload):
        raise WireError("bad_payload", f"{encoding} data is empty; expected the bytes of a {encoding} file")
    return [_pack(_frame_header(frame)), frame.payload]


def encode_result(result: Result) -> list:
    """[header bytes] or [header bytes, defect map]; the map is sent without a copy when C-contiguous."""
    result = dataclasses.replace(result)  # checks the fields again: timing is a mutable dict
    header = {"v": VERSION, "kind": "result", "stream": result.stream, "seq": result.seq, "t_ns": result.t_ns,
              "verdict": result.verdict, "score": result.score,
              "regions": [{"bbox": list(r.bbox), "area": r.area, "score": r.score} for r in result.regions],
              "timing": result.timing, "error": result.error}
    if result.meta:
        header["meta"] = result.meta
    if result.defect_map is None:
        return [_pack(header)]
    defect_map = np.ascontiguousarray(result.defect_map)
    header["map_shape"] = list(defect_map.shape)
    return [_pack(header), _flat(defect_map)]


def encode_eos(stream: str, count: int, dropped: int = 0) -> list:
    """[header bytes]: the producer sent ``count`` frames on ``stream`` and dropped ``dropped``."""
    eos = Eos(stream, count, dropped)
    return [_pack({"v": VERSION, "kind": "eos", "stream": eos.stream, "count": eos.count, "dropped": eos.dropped})]


def encode_scored(frame: Frame, score: float, grid_map: np.ndarray, image: np.ndarray | None,
                  timing: dict[str, float], heat: np.ndarray | None = None) -> list:
    """[header, float32 map (, uint8 canvas image) (, uint8 heat)]; buffers are sent without a copy,
    so the caller must not reuse them until sent (pass copies of reused batch buffers)."""
    s = Scored(frame.stream, frame.seq, frame.t_ns, frame.shape, score, np.ascontiguousarray(grid_map, np.float32),
               None if image is None else np.ascontiguousarray(image), dict(timing), frame.product, frame.meta,
               None if heat is None else np.ascontiguousarray(heat))
    header = {"v": VERSION, "kind": "scored", "stream": s.stream, "seq": s.seq, "t_ns": s.t_ns,
              "shape": list(s.shape), "product": s.product, "meta": s.meta, "score": s.score,
              "grid": list(s.grid_map.shape), "timing": s.timing}
    out = [_flat(s.grid_map)]
    if s.image is not None:
        header["canvas"] = list(s.image.shape[:2])
        out.append(_flat(s.image))
    if s.heat is not None:
        header["heat"] = list(s.heat.shape)
        out.append(_flat(s.heat))
    return [_pack(header), *out]


def encode_ack(stream: str, next_seq: int, missing: Sequence[int] = (), done: bool = False,
               held: Sequence[int] = ()) -> list:
    """[header bytes]: the sink's cumulative acknowledgement of a stream (see :class:`Ack`)."""
    a = Ack(stream, next_seq, tuple(sorted(missing)), done, tuple(sorted(held)))
    return [_pack({"v": VERSION, "kind": "ack", "stream": a.stream, "next": a.next, "missing": list(a.missing),
                   "done": a.done, "held": list(a.held)})]


def encode_control(event: str, role: str, name: str, data: dict[str, Any] | None = None) -> list:
    """[header bytes]: a stage's ready / stats / status report."""
    c = Control(event, role, name, {} if data is None else data)
    return [_pack({"v": VERSION, "kind": "control", "event": c.event, "role": c.role, "name": c.name, "data": c.data})]


def _now(t_ns: int | None) -> int:
    return time.time_ns() if t_ns is None else t_ns


def _flat(array: np.ndarray) -> memoryview:
    return memoryview(array).cast("B")  # zero-copy; array is C-contiguous


def _frame_header(frame: Frame) -> dict:
    header = {"v": VERSION, "kind": "frame", "stream": frame.stream, "seq": frame.seq, "t_ns": frame.t_ns,
              "shape": list(frame.shape), "dtype": frame.dtype, "encoding": frame.encoding,
              "product": frame.product, "meta": frame.meta}
    if frame.error is not None:
        header["error"] = frame.error
    return header


# ---- decoder ----

def decode(frames: Sequence[bytes | memoryview | zmq.Frame]) -> Frame | Result | Eos | Scored | Control | Ack:
    """Parse one multipart message (as from ``recv_multipart(copy=False)``) without copying its buffers.

    A Frame's payload and a Result's defect map are views into the received buffers. Raises
    WireError (see REASONS) for anything that is not a valid version-1 message, with stream, seq
    and t_ns attached when the header got that far; TypeError only if a frame is not a buffer.
    """
    if len(frames) == 0:
        raise WireError("frame_count", "received 0 frames; expected a msgpack header frame and its buffers")
    head, *rest = (_bytes_view(f) for f in frames)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError("header_too_large", f"header frame is {len(head)} bytes; the limit is "
                                            f"MAX_HEADER_BYTES = {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as e:  # any parse failure of untrusted bytes is a rejection, never a dead worker
        raise WireError("not_msgpack", f"header frame ({len(head)} bytes) is not msgpack "
                                       f"({type(e).__name__}: {_show(str(e))}); expected a msgpack map") from None
    if not isinstance(header, dict):
        raise WireError("not_msgpack", f"header is a msgpack {type(header).__name__}; expected a map")
    if "v" not in header:
        raise WireError("bad_version", f"header has no 'v' field; expected 'v': {VERSION}")
    if not (_is_int(header["v"]) and header["v"] == VERSION):
        raise WireError("bad_version", f"header version {_show(header['v'])}; this lineguard reads version {VERSION}")
    stream, seq, t_ns = (header.get(k) for k in ("stream", "seq", "t_ns"))
    try:
        kind = header.get("kind")
        if kind == "frame":
            return _decode_frame(header, rest)
        if kind == "result":
            return _decode_result(header, rest)
        if kind == "eos":
            _keys("eos", header, _EOS_FIELDS, _EOS_FIELDS - {"dropped"})
            _frame_count("eos", rest, 0)
            return Eos(header["stream"], header["count"], header.get("dropped", 0))
        if kind == "scored":
            return _decode_scored(header, rest)
        if kind == "control":
            _keys("control", header, _CONTROL_FIELDS, _CONTROL_FIELDS - {"data"})
            _frame_count("control", rest, 0)
            return Control(header["event"], header["role"], header["name"], header.get("data", {}))
        if kind == "ack":
            _keys("ack", header, _ACK_FIELDS, _ACK_REQUIRED)
            _frame_count("ack", rest, 0)
            return Ack(header["stream"], header["next"], header["missing"], header["done"], header.get("held", ()))
        raise WireError("bad_kind", f"message kind {_show(kind)}; expected 'frame', 'result', 'eos', 'scored', "
                                    f"'control' or 'ack'")
    except WireError as e:
        e.stream = stream if isinstance(stream, str) and stream else None
        e.seq = seq if _is_int(seq) and 0 <= seq <= _UINT64 else None
        e.t_ns = t_ns if _is_int(t_ns) and 0 <= t_ns <= _UINT64 else None
        raise


def _frame_count(kind: str, rest: list, expected: int) -> None:
    if len(rest) != expected:
        raise WireError("frame_count", f"{kind} message has {1 + len(rest)} frames; expected {1 + expected} "
                                       f"(header{' + buffer' * expected})")


def _decode_frame(header: dict, rest: list) -> Frame:
    _keys("frame", header, _FRAME_FIELDS, _FRAME_FIELDS - {"product", "meta", "error"})
    _frame_count("frame", rest, 1)
    return Frame(header["stream"], header["seq"], header["t_ns"], header["shape"], header["dtype"],
                 header["encoding"], rest[0], header.get("product"), header.get("meta", {}), header.get("error"))


def _decode_scored(header: dict, rest: list) -> Scored:
    _keys("scored", header, _SCORED_FIELDS, _SCORED_FIELDS - {"product", "meta", "timing", "canvas", "heat"})
    _frame_count("scored", rest, 1 + ("canvas" in header) + ("heat" in header))
    h, w = _sides("grid", header["grid"], 2)
    if len(rest[0]) != h * w * 4:
        raise WireError("payload_size", f"anomaly map is {len(rest[0])} bytes; grid [{h}, {w}] float32 needs {h * w * 4}")
    grid_map = np.frombuffer(rest[0], "<f4").reshape(h, w)
    grid_map.flags.writeable = False
    image = heat = None
    at = 1
    if "canvas" in header:
        ch, cw = _sides("canvas", header["canvas"], 2)
        if len(rest[at]) != ch * cw * 3:
            raise WireError("payload_size", f"canvas image is {len(rest[at])} bytes; canvas [{ch}, {cw}] RGB needs "
                                            f"{ch * cw * 3}")
        image = np.frombuffer(rest[at], np.uint8).reshape(ch, cw, 3)
        image.flags.writeable = False
        at += 1
    if "heat" in header:
        hh, hw = _sides("heat", header["heat"], 2)
        if len(rest[at]) != hh * hw:
            raise WireError("payload_size", f"heat is {len(rest[at])} bytes; [{hh}, {hw}] uint8 needs {hh * hw}")
        heat = np.frombuffer(rest[at], np.uint8).reshape(hh, hw)
        heat.flags.writeable = False
    return Scored(header["stream"], header["seq"], header["t_ns"], header["shape"], header["score"], grid_map, image,
                  header.get("timing", {}), header.get("product"), header.get("meta", {}), heat)


def _decode_result(header: dict, rest: list) -> Result:
    _keys("result", header, _RESULT_FIELDS, {"v", "kind", "stream", "seq", "t_ns", "verdict"})
    _frame_count("result", rest, int("map_shape" in header))
    regions = header.get("regions", [])
    if not isinstance(regions, list):
        raise WireError("bad_field", f"regions must be a list, got {_show(regions)}")
    for r in regions:
        if not isinstance(r, dict) or r.keys() != {"bbox", "area", "score"}:
            raise WireError("bad_field", f"a region must be a map with bbox, area and score, got {_show(r)}")
    defect_map = None
    if "map_shape" in header:
        h, w = _sides("map_shape", header["map_shape"], 2)
        if len(rest[0]) != h * w:
            raise WireError("payload_size", f"defect map is {len(rest[0])} bytes; map_shape [{h}, {w}] uint8 "
                                            f"needs {h * w}")
        defect_map = np.frombuffer(rest[0], np.uint8).reshape(h, w)
        defect_map.flags.writeable = False
    return Result(header["stream"], header["seq"], header["t_ns"], header["verdict"], header.get("score"),
                  tuple(Region(**r) for r in regions), header.get("timing", {}), header.get("error"), defect_map,
                  header.get("meta", {}))


# ---- jpeg / png ----

# (decoded channels, wanted channels) -> OpenCV conversion; OpenCV decodes to grey, BGR or BGRA
_CONVERSIONS = {(1, 3): "COLOR_GRAY2RGB", (1, 4): "COLOR_GRAY2RGBA", (3, 1): "COLOR_BGR2GRAY",
                (3, 3): "COLOR_BGR2RGB", (3, 4): "COLOR_BGR2RGBA", (4, 1): "COLOR_BGRA2GRAY",
                (4, 3): "COLOR_BGRA2RGB", (4, 4): "COLOR_BGRA2RGBA"}


def _decode_file(data: memoryview, encoding: str, shape: tuple[int, int, int], dtype: str,
                 shrink: int = 1) -> np.ndarray:
    import cv2  # only receivers of encoded frames pay for importing OpenCV

    h, w, c = shape
    size = images.file_size(data, encoding)
    if size is None:
        raise WireError("bad_payload", f"payload ({len(data)} bytes) is not a whole {encoding} file: no image header "
                                       f"or a chunk runs past the end")
    if size != (h, w):
        raise WireError("bad_payload", f"{encoding} file is {size[0]}x{size[1]} (H x W); header shape says {h}x{w}")
    buf = np.frombuffer(data, np.uint8)
    flags, shrink = images.imdecode_flags(buf, shrink)  # a jpeg only: the file_size check above read its header
    try:
        image = cv2.imdecode(buf, flags)
    except cv2.error:
        image = None
    if image is None:
        raise WireError("bad_payload", f"{encoding} payload ({len(data)} bytes) does not decode")
    decoded = 1 if image.ndim == 2 else image.shape[2]
    conversion = _CONVERSIONS.get((decoded, c))
    if conversion is not None:
        image = cv2.cvtColor(image, getattr(cv2, conversion))
    elif decoded != c:
        raise WireError("bad_payload", f"{encoding} file decodes to {decoded} channels; cannot convert to {c}")
    image = image.reshape(image.shape[0], image.shape[1], -1)
    expected = (*images.shrunk((h, w), shrink), c)
    if image.shape != expected or image.dtype != np.dtype(dtype):
        at = f" (at 1/{shrink}: {list(expected)})" if shrink > 1 else ""
        raise WireError("bad_payload", f"{encoding} file decodes to {list(image.shape)} {image.dtype}; "
                                       f"header says {list(shape)} {dtype}{at}")
    return image
