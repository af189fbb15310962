"""A whole line from one TOML file: `lineguard run --line line.toml`.

    out = "out/line"                  # optional: results.jsonl, maps/, overlays/ (paths relative to this file)
    metrics_port = 9100               # optional: Prometheus, one port per stage from here (pipeline.metrics)
    view_port = 8080                  # optional: the live web view (pipeline.view)
    pub = "tcp://*:5557"              # optional: the result stream
    drain_timeout = 5.0               # optional
    retry_after = 10.0                # optional
    respawn = true                    # optional: restart stages that die
    ready_timeout = 120.0             # optional: seconds every stage may take to load and warm up

    [products.tile]                   # one model and its workers
    model = "models/tile"
    workers = 0                       # optional (0: auto, one per core), and the rest of this table
    post_workers = 1
    batch = 8
    batch_ms = 10.0
    runtime = "onnxruntime"           # onnxruntime | torch | tensorrt
    precision = "fp32"
    device = "cpu"
    threads = 2                       # per inference worker (default: the cores shared among all of them)

    [[streams]]                       # one per camera or file source
    name = "cam0"
    source = "camera:0"               # any `run --source` spec
    product = "tile"
    frames = 0                        # optional: 0 takes all
    mode = "live"                     # optional: lossless | live (default by source)
    camera = { exposure = 8000, gain = 2, trigger = "software" }   # optional: genicam sources

A region of interest belongs to the product's model (`lineguard fit --roi`). Every key is checked
before anything starts; an error names the key, what it expected and what it got.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from engines.errors import ConfigError, LineguardError
from engines.runtimes import Deployment
from pipeline.producers import parse_source
from pipeline.run import Line, Product, Stream

TOP = {"out": str, "metrics_port": int, "view_port": int, "pub": str, "drain_timeout": float, "retry_after": float,
       "respawn": bool, "ready_timeout": float, "products": dict, "streams": list}
PRODUCT = {"model": str, "workers": int, "post_workers": int, "batch": int, "batch_ms": float, "runtime": str,
           "precision": str, "device": str, "threads": int}
STREAM = {"name": str, "source": str, "product": str, "frames": int, "mode": str, "camera": dict}
DEPLOYMENT = ("runtime", "precision", "device", "threads")


def _check(table: dict, schema: dict, where: str, required: tuple[str, ...], file: Path) -> dict:
    """`table` with every key known to `schema`, of its type (ints accepted for floats), required keys present."""
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{file}: {where}{key} is not a line-file key; valid: {', '.join(schema)}")
        kind = schema[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{file}: {where}{key} must be a {kind.__name__}, got {value!r}")
    for key in required:
        if key not in table:
            raise ConfigError(f"{file}: {where}{key} is missing")
    return table


def load_line(path: str | Path) -> Line:
    """The validated Line of a line file; ConfigError naming the key (and the file) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"line file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    base = path.resolve().parent
    _check(data, TOP, "", ("products", "streams"), path)
    products = []
    for name, table in data["products"].items():
        where = f"products.{name}."
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: products.{name} must be a table ([products.{name}])")
        _check(table, PRODUCT, where, ("model",), path)
        model = base / table["model"]
        if not (model / "manifest.json").is_file():
            raise ConfigError(f"{path}: {where}model {table['model']!r}: no model there ({model}); fit one with "
                              f"lineguard fit DATA -o {model}")
        try:
            deployment = Deployment(**{k: table[k] for k in DEPLOYMENT if k in table})
            products.append(Product(name, model, **{k: table[k] for k in ("workers", "post_workers", "batch",
                                                                          "batch_ms") if k in table},
                                    deployment=deployment))
        except LineguardError as exc:
            raise ConfigError(f"{path}: products.{name}: {exc}") from exc
    streams = []
    for i, table in enumerate(data["streams"]):
        where = f"streams[{i}]."
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: streams[{i}] must be a table ([[streams]])")
        _check(table, STREAM, where, ("name", "source", "product"), path)
        source = table["source"]
        if (base / source).exists():  # a folder or video file next to the line file
            source = str(base / source)
        try:
            parse_source(source)
            camera = ",".join(f"{k}={v}" for k, v in table.get("camera", {}).items())
            streams.append(Stream(table["name"], source, table["product"], table.get("frames", 0), table.get("mode"),
                                  camera))
        except LineguardError as exc:  # a bad source spec or stream field: say where it came from
            raise ConfigError(f"{path}: {where[:-1]}: {exc}") from exc
    try:
        return Line(tuple(products), tuple(streams), out=base / data["out"] if "out" in data else None,
                    pub=data.get("pub"), drain_timeout=data.get("drain_timeout", 5.0),
                    retry_after=data.get("retry_after", 10.0), metrics_port=data.get("metrics_port"),
                    view_port=data.get("view_port"), respawn=data.get("respawn", True),
                    ready_timeout=data.get("ready_timeout", 120.0))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
