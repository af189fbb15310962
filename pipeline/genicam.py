"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis: `--source genicam:SERIAL`.

Aravis is the open GenICam stack of Linux distributions (Debian: libaravis-0.8-0): it speaks GigE
Vision and USB3 Vision itself, so no vendor GenTL producer (.cti) is needed, as it would be with
harvesters. lineguard calls its C API through ctypes: nothing to compile into the environment,
and the dozen calls needed are plain C. Install: `apt-get install libaravis-0.8-0`
(`aravis-tools` adds `arv-fake-gv-camera-0.8`, a GigE Vision camera simulator the tests use).

A camera is found by serial number, device id, user id or address. `--camera k=v,...` sets
`exposure` (us), `gain`, `fps`, `trigger` (software | line0 | off), `pixel_format` and any other
GenICam feature by name; what the camera then reports is read back into every frame's meta
(`camera`), with the device's `frame_id` and `timestamp_ns`. A camera that stops answering is
reopened (every second) and the frames lost in between are counted from its frame ids.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import numpy as np

from calibration.images import PIXEL_FORMATS, ImageError, from_pixel_format
from engines.errors import ConfigError

SETTINGS = ("exposure", "gain", "fps", "trigger", "pixel_format")
BUFFERS = 8


class GenICamError(ConfigError):
    """A camera that cannot be found, opened or configured, or a missing Aravis library."""


class _GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int), ("message", ctypes.c_char_p)]


_LIB = None


def aravis() -> ctypes.CDLL:
    """libaravis-0.8 with the signatures used here (loaded once); GenICamError naming the package if missing."""
    global _LIB
    if _LIB is not None:
        return _LIB
    name = ctypes.util.find_library("aravis-0.8") or "libaravis-0.8.so.0"
    try:
        lib = ctypes.CDLL(name)
        gobject = ctypes.CDLL(ctypes.util.find_library("gobject-2.0") or "libgobject-2.0.so.0")
    except OSError as exc:
        raise GenICamError("GenICam sources need the Aravis library: apt-get install libaravis-0.8-0 "
                           "(aravis-tools for the camera simulator)") from exc
    p, s, u, i, d, err = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint, ctypes.c_int, ctypes.c_double, \
        ctypes.POINTER(ctypes.POINTER(_GError))
    signatures = {
        "arv_update_device_list": (None, []), "arv_get_n_devices": (u, []),
        **{f"arv_get_device_{k}": (s, [u]) for k in ("id", "vendor", "model", "serial_nbr", "address", "protocol")},
        "arv_camera_new": (p, [s, err]), "arv_camera_get_device": (p, [p]),
        "arv_camera_get_payload": (u, [p, err]), "arv_camera_create_stream": (p, [p, p, p, err]),
        "arv_camera_set_acquisition_mode": (None, [p, i, err]),
        "arv_camera_start_acquisition": (None, [p, err]), "arv_camera_stop_acquisition": (None, [p, err]),
        "arv_camera_set_exposure_time": (None, [p, d, err]), "arv_camera_get_exposure_time": (d, [p, err]),
        "arv_camera_set_gain": (None, [p, d, err]), "arv_camera_get_gain": (d, [p, err]),
        "arv_camera_is_gain_available": (i, [p, err]),
        "arv_camera_set_frame_rate": (None, [p, d, err]), "arv_camera_get_frame_rate": (d, [p, err]),
        "arv_camera_set_trigger": (None, [p, s, err]), "arv_camera_clear_triggers": (None, [p, err]),
        "arv_camera_software_trigger": (None, [p, err]),
        "arv_camera_set_pixel_format_from_string": (None, [p, s, err]),
        "arv_camera_get_pixel_format_as_string": (s, [p, err]),
        "arv_camera_get_string": (s, [p, s, err]),
        "arv_device_set_features_from_string": (i, [p, s, err]),
        "arv_buffer_new": (p, [ctypes.c_size_t, p]), "arv_stream_push_buffer": (None, [p, p]),
        "arv_stream_timeout_pop_buffer": (p, [p, ctypes.c_uint64]),
        "arv_buffer_get_status": (i, [p]), "arv_buffer_get_data": (p, [p, ctypes.POINTER(ctypes.c_size_t)]),
        "arv_buffer_get_image_width": (i, [p]), "arv_buffer_get_image_height": (i, [p]),
        "arv_buffer_get_frame_id": (ctypes.c_uint64, [p]), "arv_buffer_get_timestamp": (ctypes.c_uint64, [p]),
    }
    for fn, (restype, argtypes) in signatures.items():
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, argtypes
    gobject.g_object_unref.argtypes, gobject.g_object_unref.restype = [p], None
    lib.g_object_unref = gobject.g_object_unref
    _LIB = lib
    return lib


def _call(fn, *args, what: str):
    """fn(*args, &error); GenICamError with Aravis' message when it sets one."""
    error = ctypes.POINTER(_GError)()
    out = fn(*args, ctypes.byref(error))
    if error:
        message = error.contents.message.decode(errors="replace") if error.contents.message else "unknown error"
        raise GenICamError(f"{what}: {message}")
    return out


def list_cameras() -> list[dict]:
    """Every GenICam device Aravis finds: id, vendor, model, serial, address, protocol."""
    lib = aravis()
    lib.arv_update_device_list()
    keys = ("id", "vendor", "model", "serial_nbr", "address", "protocol")
    out = []
    for index in range(lib.arv_get_n_devices()):
        row = {k: (getattr(lib, f"arv_get_device_{k}")(index) or b"").decode(errors="replace") for k in keys}
        row["serial"] = row.pop("serial_nbr")
        out.append(row)
    return out


def parse_settings(text: str) -> dict[str, str]:
    """'exposure=8000,gain=2,trigger=software' -> {name: value}; ConfigError naming a malformed item."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--camera {item!r}: expected name=value, e.g. exposure=8000,gain=2,trigger=software")
        out[key.strip()] = value.strip()
    return out


class GenICamCamera:
    """One opened camera: found, configured, streaming into a ring of BUFFERS Aravis buffers."""

    def __init__(self, wanted: str, settings: dict[str, str]):
        self.lib = aravis()
        self.wanted, self.settings = wanted, dict(settings)
        self.camera = self.stream = None
        self.address = self._find(wanted)
        try:
            self._open()
        except BaseException:
            self.close()  # a half-opened camera keeps its control channel (and the camera) until released
            raise

    def _find(self, wanted: str) -> str:
        cameras = list_cameras()
        for cam in cameras:
            if wanted in (cam["serial"], cam["id"], cam["address"]):
                return cam["id"]
        if wanted.replace(".", "").isdigit():  # an IP address Aravis' discovery did not list: ask it directly
            return wanted
        found = "; ".join(f"{c['vendor']} {c['model']} serial {c['serial']} at {c['address']}" for c in cameras)
        raise GenICamError(f"genicam camera {wanted!r} not found; found: {found or 'none'} "
                           "(give a serial number, device id or address: lineguard cameras lists them)")

    def _open(self) -> None:
        lib = self.lib
        self.camera = _call(lib.arv_camera_new, self.address.encode(), what=f"opening camera {self.wanted!r}")
        if not self.camera:
            raise GenICamError(f"camera {self.wanted!r} could not be opened")
        self._configure()
        self.pixel_format = (_call(lib.arv_camera_get_pixel_format_as_string, self.camera, what="pixel format")
                             or b"").decode()
        if self.pixel_format not in PIXEL_FORMATS:
            raise GenICamError(f"camera {self.wanted!r} sends {self.pixel_format}; set pixel_format to one of "
                               f"{', '.join(PIXEL_FORMATS)} (--camera pixel_format=Mono8)")
        self.readback = self._read_back()
        payload = _call(lib.arv_camera_get_payload, self.camera, what="payload size")
        self.stream = _call(lib.arv_camera_create_stream, self.camera, None, None, what="creating the stream")
        if not self.stream:
            raise GenICamError(f"camera {self.wanted!r}: no stream could be created")
        for _ in range(BUFFERS):
            lib.arv_stream_push_buffer(self.stream, lib.arv_buffer_new(payload, None))
        _call(lib.arv_camera_set_acquisition_mode, self.camera, 0, what="acquisition mode continuous")
        _call(lib.arv_camera_start_acquisition, self.camera, what="starting acquisition")

    def _configure(self) -> None:
        lib, cam = self.lib, self.camera
        for key, value in self.settings.items():
            what = f"camera {self.wanted!r}: setting {key}={value}"
            try:
                if key in ("exposure", "gain", "fps"):
                    number = float(value)
                    fn = {"exposure": lib.arv_camera_set_exposure_time, "gain": lib.arv_camera_set_gain,
                          "fps": lib.arv_camera_set_frame_rate}[key]
                    _call(fn, cam, number, what=what)
                elif key == "trigger":
                    if value.lower() == "off":
                        _call(lib.arv_camera_clear_triggers, cam, what=what)
                    else:
                        _call(lib.arv_camera_set_trigger, cam, {"software": "Software", "line0": "Line0"}.get(
                            value.lower(), value).encode(), what=what)
                elif key == "pixel_format":
                    _call(lib.arv_camera_set_pixel_format_from_string, cam, value.encode(), what=what)
                else:  # any other GenICam feature by its name
                    device = lib.arv_camera_get_device(cam)
                    _call(lib.arv_device_set_features_from_string, device, f"{key}={value}".encode(), what=what)
            except ValueError as exc:
                raise GenICamError(f"{what}: {key} takes a number") from exc

    def _read_back(self) -> dict:
        """What the camera reports after configuration (what it could not report is left out)."""
        lib, cam = self.lib, self.camera
        out = {"serial": self.wanted, "pixel_format": self.pixel_format}
        for key, fn in (("exposure", lib.arv_camera_get_exposure_time), ("fps", lib.arv_camera_get_frame_rate)):
            try:
                out[key] = round(float(_call(fn, cam, what=key)), 3)
            except GenICamError:
                pass
        try:
            if _call(lib.arv_camera_is_gain_available, cam, what="gain"):
                out["gain"] = round(float(_call(lib.arv_camera_get_gain, cam, what="gain")), 3)
        except GenICamError:
            pass
        if "trigger" in self.settings:
            out["trigger"] = self.settings["trigger"]
        return out

    def grab(self, timeout_s: float) -> tuple[np.ndarray, int, int] | None:
        """(uint8 RGB [H, W, 3], device frame id, device timestamp ns) of the next complete frame, or None
        after `timeout_s` without one. An incomplete frame raises ImageError (its buffer is recycled)."""
        lib = self.lib
        if self.settings.get("trigger", "").lower() == "software":
            _call(lib.arv_camera_software_trigger, self.camera, what="software trigger")
        buffer = lib.arv_stream_timeout_pop_buffer(self.stream, int(timeout_s * 1e6))
        if not buffer:
            return None
        try:
            status = lib.arv_buffer_get_status(buffer)
            if status != 0:
                raise ImageError(f"camera {self.wanted!r}: incomplete frame (Aravis buffer status {status})")
            size = ctypes.c_size_t()
            data = lib.arv_buffer_get_data(buffer, ctypes.byref(size))
            raw = np.frombuffer(ctypes.string_at(data, size.value), np.uint8)
            h, w = lib.arv_buffer_get_image_height(buffer), lib.arv_buffer_get_image_width(buffer)
            image = from_pixel_format(raw, h, w, self.pixel_format, f"camera {self.wanted!r}", keep_grey=True)
            return image, int(lib.arv_buffer_get_frame_id(buffer)), int(lib.arv_buffer_get_timestamp(buffer))
        finally:
            lib.arv_stream_push_buffer(self.stream, buffer)

    def close(self) -> None:
        lib = self.lib
        if self.camera:
            try:
                _call(lib.arv_camera_stop_acquisition, self.camera, what="stopping")
            except GenICamError:
                pass  # a camera that went away cannot be stopped
        for obj in (self.stream, self.camera):
            if obj:
                lib.g_object_unref(obj)
        self.stream = self.camera = None


def reopen(wanted: str, settings: dict[str, str], give_up_s: float, stop) -> GenICamCamera | None:
    """The camera opened again, trying once a second for `give_up_s` (None: it did not come back)."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline and not stop():
        try:
            return GenICamCamera(wanted, settings)
        except GenICamError:
            time.sleep(1.0)
    return None
