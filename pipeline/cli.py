"""The `lineguard` command."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

from engines.errors import ConfigError, LineguardError

CAMERA_HELP = ("genicam sources: exposure=US,gain=G,fps=F,trigger=software|line0|off,pixel_format=Mono8 "
               "and any GenICam feature NAME=VALUE")
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_iou_max",
               "pixel_aupro")


class ProgressBar:
    """A one-line progress bar on stderr with the rate's ETA and an optional note (e.g. the loss),
    redrawn at most 10 times a second; silent when not a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0
        self.stage = None
        self.started = 0.0

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.started = stage, now
        elif done < total and now - self.last < 0.1:
            return
        self.last = now
        filled = int(30 * done / max(total, 1))
        eta = (now - self.started) / done * (total - done) if done else 0.0
        tail = f" ETA {eta:4.0f} s" if done < total else f" {now - self.started:5.1f} s"
        self.stream.write(f"\r{stage:>10} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}{tail} {note}\033[K")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def ready_to_write(files=(), folders=()) -> None:
    """Make the folders of the output files and the output folders now, and check they can be written,
    so that a path the system refuses fails before the work, not after it (OSError: one line, `main`)."""
    from calibration.artifact import writable_folder

    for folder in [Path(f).parent for f in files if f is not None] + [Path(d) for d in folders if d is not None]:
        writable_folder(folder)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _layers(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _input_size(text: str) -> tuple[int, int]:
    """"256" (square) or "HxW", e.g. "224x320"."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give S or HxW in pixels, e.g. 256 or 224x320") from None
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give S or HxW in pixels, e.g. 256 or 224x320")
    return (sides[0], sides[-1])


def _deployment(args):
    from engines.runtimes import Deployment

    if getattr(args, "deployment", None):
        return Deployment.from_json(args.deployment)
    return Deployment(runtime=args.runtime, precision=args.precision, device=args.device, threads=args.threads,
                      cuda_graphs=args.cuda_graphs)


def _kind_options(args):
    """The chosen kind's options from the flags given on the command line (its defaults for the rest)."""
    from calibration.kinds import get_kind, kind_names

    kind = get_kind(args.kind)
    every = dict.fromkeys(f for k in kind_names() for f in get_kind(k).options.FLAGS)  # each kind lists its own
    # not given: None (valued options) or False (switches); 0 is a value (--dim 0, --coreset-max 0)
    given = {d: v for d in every if (v := getattr(args, d)) is not None and v is not False}
    for dest in given:
        if dest not in kind.options.FLAGS:
            owners = [k for k in kind_names() if dest in get_kind(k).options.FLAGS]
            flag = "--" + dest.replace("_", "-")
            raise LineguardError(f"{flag} applies to --kind {' or '.join(owners)}, not to --kind {args.kind}")
    return kind.options.from_flags(given, seed=args.seed)


def cmd_fit(args) -> int:
    from calibration.fit import FitConfig, fit
    from calibration.geometry import Geometry, InputSpec
    from calibration.maps import MapConfig

    options = _kind_options(args)
    spec = InputSpec(*args.input_size) if args.input_size else None
    geometry = Geometry(tiling="tiles" if args.tiles else "resize", scale=args.tile_scale, overlap=args.tile_overlap,
                        photometric=args.photometric, jpeg_decode=args.jpeg_decode)
    maps = MapConfig(blur_sigma=args.blur_sigma, image_score=args.image_score, top_k=args.top_k,
                     border_rings=args.border_rings)
    config = FitConfig(kind=args.kind, options=options, input=spec, geometry=geometry, roi=args.roi, maps=maps,
                       weights=args.weights, calib_images=args.calib_images, max_false_reject=args.max_false_reject,
                       deployment=_deployment(args), batch_size=args.batch_size, seed=args.seed)
    summary = fit(args.data, args.output, config, progress=ProgressBar())
    details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items()
                        if k not in ("kind", "fit_seconds", "input") and not isinstance(v, (list, dict)))
    print(f"fitted {args.output}: {summary['kind']}, input {summary['input'][0]}x{summary['input'][1]}, {details}; "
          f"{summary['fit_seconds']:.1f} s")
    if "finer" in summary:
        finer = summary["finer"]
        print(f"note: a map cell covers {summary['cell_pixels']:.0f} pixels of these frames, so a defect much smaller "
              f"may go unseen; --tiles --tile-scale {finer['tile_scale']:g} halves that, at "
              f"{finer['inputs_per_frame']} inputs a frame instead of {summary['inputs_per_frame']}")
    return 0


def print_metrics(result: dict) -> None:
    """One column per category (and their mean), one row per metric; then each category's defect types."""
    cats = result["categories"]
    names = list(cats) + (["mean"] if len(cats) > 1 else [])
    width = max(10, *(len(n) + 2 for n in names))
    print(f"{'metric':<16}" + "".join(f"{n:>{width}}" for n in names))
    for key in METRIC_KEYS + ("images_per_s",):
        values = [cats[n][key] for n in cats] + ([result["mean"][key]] if len(cats) > 1 else [])
        fmt = ".1f" if key == "images_per_s" else ".4f"
        print(f"{key:<16}" + "".join(f"{_cell(v, fmt):>{width}}" for v in values))
    for key, what in (("false_reject", "good"), ("miss", "defective")):
        cells = [f"{cats[n][key]['count']}/{cats[n][key]['of']}" for n in cats]
        print(f"{key:<16}" + "".join(f"{c:>{width}}" for c in cells) + f"   ({what} test images, at the calibrated threshold)")
    for name, m in cats.items():
        print(f"\n{name}: {m['n_images']} images, {m['n_defective']} defective")
        for why in m["undefined"]:
            print(f"  n/a: {why}")
        print(f"  {'defect type':<16}{'image_auroc':>12}{'pixel_auroc':>12}{'pixel_aupro':>12}{'missed':>10}")
        for t, pt in m["per_type"].items():
            missed = f"{pt['miss']['count']}/{pt['miss']['of']}"
            print(f"  {t:<16}" + "".join(f"{_cell(pt[k], '.4f'):>12}" for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))
                  + f"{missed:>10}")


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def cmd_eval(args) -> int:
    import dataclasses as dc

    from calibration.evaluate import evaluate, plot_curves
    from calibration.model import Model

    model = Model(args.model)
    deployment = _deployment(args)
    ready_to_write([args.json], [args.maps, args.scores])
    result = evaluate(model, args.data, deployment, batch_size=args.batch_size, maps_dir=args.maps,
                      scores_dir=args.scores, progress=ProgressBar(), curves=args.json is not None)
    print_metrics(result)
    result["config"] = {"model": str(args.model), "data": [str(d) for d in args.data], "kind": model.kind.name,
                        "deployment": dc.asdict(deployment), "input": [model.spec.height, model.spec.width],
                        "geometry": dc.asdict(model.geometry), "maps": dc.asdict(model.maps),
                        "batch_size": args.batch_size, "fit": model.manifest.get("fit", {}),
                        model.kind.name: model.manifest.get(model.kind.name)}
    if args.json:
        curves = plot_curves(result, args.json)
        for m in result["categories"].values():
            m.pop("curves", None)
        result.pop("curves", None)
        result["curve_plots"] = [str(c) for c in curves]
        write_json(args.json, result)
    return 0


def cmd_fuse(args) -> int:
    from calibration.ensemble import EnsembleOptions, fuse

    manifest = fuse(args.models, args.output, EnsembleOptions(fusion=args.fusion))
    print(f"fused {len(args.models)} models ({', '.join(manifest['ensemble']['kinds'])}) into {args.output}: "
          f"{args.fusion} of their maps in threshold units")
    return 0


def cmd_demo(args) -> int:
    """Synthetic product with planted defects -> fit -> eval with defect-map overlays."""
    from calibration.synthetic import make_dataset

    out = args.out
    data = make_dataset(out / "data", seed=args.seed)
    print(f"wrote a synthetic dataset with planted defects to {data}")
    steps = [
        ["fit", str(data), "-o", str(out / "model"), "--seed", str(args.seed)],
        ["eval", str(out / "model"), str(data), "--json", str(out / "metrics.json"), "--maps", str(out / "maps"),
         "--scores", str(out / "scores")],
        ["run", str(out / "model"), "--source", "synthetic", "--frames", str(args.frames), "--out", str(out / "run"),
         "--json", str(out / "run" / "summary.json")],
    ]
    for step in steps:
        print(f"\n$ lineguard {' '.join(step)}")
        code = main(step)
        if code:
            return code
    print(f"\nresults: {out / 'run' / 'results.jsonl'}; defective frames: {out / 'run' / 'overlays'}")
    return 0


def cmd_produce(args) -> int:
    from pipeline.security import curve_for

    import threading

    from pipeline.metrics import stage_metrics
    from pipeline.producers import open_source, produce
    from pipeline.workers import stop_on_signals

    stop, end = threading.Event(), threading.Event()
    stop_on_signals(stop, end)  # Ctrl-C ends the stream (what was sent is still seen through); twice: stop
    from pipeline.genicam import parse_settings

    source = open_source(args.source, frames=args.frames, size=args.size, seed=args.seed,
                         camera=parse_settings(args.camera))
    stats = produce(source, args.frames_endpoint, args.sink, stream=args.stream, mode=args.mode, hold=args.hold,
                    acks_endpoint=args.acks, retry_after=args.retry_after, window=args.window,
                    curve=curve_for(args.keys, "producer"),
                    metrics=stage_metrics("producer", args.stream, args.metrics_port), stop=stop, end=end)
    print(f"produced {stats.sent} frames on {args.stream} ({stats.dropped} dropped, {stats.missed} missed by the "
          f"source, {stats.resent} sent again, "
          f"{stats.abandoned} abandoned)", file=sys.stderr)
    return 0


def cmd_worker(args) -> int:
    from pipeline.security import curve_for

    from pipeline.workers import inference_worker

    stats = inference_worker(args.model, args.frames, args.out, deployment=_deployment(args), batch=args.batch_size,
                             batch_ms=args.batch_ms, control=args.control, name=args.name,
                             curve=curve_for(args.keys, "worker"), metrics_port=args.metrics_port)
    print(f"{args.name}: {stats.frames} frames in {stats.batches} batches, rejected {stats.rejected}", file=sys.stderr)
    return 0


def cmd_postprocess(args) -> int:
    from pipeline.security import curve_for

    from pipeline.workers import postprocess_worker

    stats = postprocess_worker(args.model, args.inp, args.sink, overlays=args.overlays, attach_maps=not args.no_maps,
                               control=args.control, name=args.name, curve=curve_for(args.keys, "postprocess"),
                               metrics_port=args.metrics_port)
    print(f"{args.name}: {stats.frames} frames, rejected {stats.rejected}", file=sys.stderr)
    return 0


def cmd_cameras(args) -> int:
    from pipeline.genicam import list_cameras

    cameras = list_cameras()
    for cam in cameras:
        print(f"{cam['vendor']:<16} {cam['model']:<24} serial {cam['serial']:<16} {cam['address']:<16} "
              f"{cam['protocol']}  (--source genicam:{cam['serial']})")
    if not cameras:
        print("no GenICam camera found (GigE Vision: same subnet, no firewall on UDP 3956; USB3 Vision: udev rules)")
    return 0


def cmd_keys(args) -> int:
    from pipeline.security import write_keys

    written = write_keys(args.folder)
    print(f"wrote CURVE key pairs for {', '.join(p.stem for p in written)} in {args.folder}: give each host the "
          f"public keys (*.key) and only its own role's <role>.key_secret")
    return 0


def _sink_models(values: list[str] | None) -> dict[str, Path] | Path | None:
    """--model MODEL (every stream) or --model STREAM=MODEL ... as run_sink takes them."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return Path(values[0])
    if not all("=" in v for v in values):
        raise ConfigError("sink --model: give one MODEL for every stream, or STREAM=MODEL for each")
    return {stream: Path(model) for stream, model in (v.split("=", 1) for v in values)}


def cmd_sink(args) -> int:
    from pipeline.security import curve_for

    from pipeline.metrics import stage_metrics
    from pipeline.sinks import run_sink

    summary = run_sink(args.results, pub_endpoint=args.pub, jsonl=args.jsonl, maps_dir=args.maps,
                       streams=args.streams, drain_timeout=args.drain_timeout, control=args.control,
                       acks_endpoint=args.acks, resume=args.resume, curve=curve_for(args.keys, "sink"),
                       metrics=stage_metrics("sink", "sink", args.metrics_port), models=_sink_models(args.model),
                       view_port=args.view_port, overlays=args.overlays)
    if args.summary:
        write_json(args.summary, summary)
    return 0


class StatusLine:
    """The live status line of `run` (stderr, terminals only)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()

    def __call__(self, s: dict) -> None:
        if self.enabled:
            self.stream.write(f"\rframes {s['results']:>7} | {s['fps']:6.1f} fps | defects {s['defect']:>6} | "
                              f"drops {s['dropped']:>5} | errors {s['error']:>5}" +
                              (f" | DRIFT on {', '.join(s['drift'])}: re-calibrate" if s.get("drift") else ""))
            self.stream.flush()

    def end(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def print_summary(summary: dict) -> None:
    lat = summary["latency_ms"]
    print(f"{summary['frames_in']} frames in -> {summary['results']} results: {summary['ok']} ok, "
          f"{summary['defect']} defect, {summary['error']} error ({summary['lost']} lost); "
          f"{summary['dropped']} dropped; {summary['fps']:.1f} fps; latency p50 {lat['p50']:.1f} ms, "
          f"p99 {lat['p99']:.1f} ms")
    if summary.get("ended_on_request"):
        print("ended on request (Ctrl-C): every frame sent until then has its result")
    if summary.get("rejected"):
        print(f"rejected messages: {summary['rejected']}")
    for restart in summary.get("restarts", []):
        print(f"{restart['stage']} died (exit {restart['exit_code']}) and was restarted")
    for stream, watch in summary.get("drift", {}).items():
        if isinstance(watch, dict) and watch["alarms"]:
            state = "still drifted" if watch["alarm"] else "drifted, then recovered"
            print(f"{stream}: scores drifted from the calibration's from frame {watch['first_alarm_frame']} ({state}); "
                  "re-calibrate: refit the model on current normal images")


def _run_defaults() -> dict:
    """`lineguard run`'s options as its parser leaves them when none is given."""
    return vars(build_parser("run").parse_args(["run"]))


def cmd_run(args) -> int:
    from pipeline.run import RunConfig, run_pipeline

    if args.line is not None:
        if args.model is not None:
            raise ConfigError("give a MODEL or --line FILE, not both (the line file names each stream's model)")
        from pipeline.linefile import load_line

        given = [f"--{dest.replace('_', '-')}" for dest, default in _run_defaults().items()
                 if dest not in ("line", "model", "json", "func", "command", "debug") and getattr(args, dest) != default]
        if given:
            raise ConfigError(f"{', '.join(given)} would be ignored with --line: the line file sets the run; set them "
                              f"in {args.line} (pipeline/linefile.py lists its keys)")
        config = load_line(args.line)
    elif args.model is None:
        raise ConfigError("run needs a MODEL (lineguard run MODEL --source ...) or a line file (--line line.toml)")
    else:
        config = RunConfig(model=args.model, source=args.source, out=args.out, frames=args.frames,
                           workers=args.workers, post_workers=args.post_workers, batch=args.batch_size,
                           batch_ms=args.batch_ms, deployment=_deployment(args), mode=args.mode, stream=args.stream,
                           pub=args.pub, drain_timeout=args.drain_timeout, retry_after=args.retry_after,
                           respawn=not args.no_respawn, metrics_port=args.metrics_port, view_port=args.view_port,
                           camera=args.camera, ready_timeout=args.ready_timeout)
    ready_to_write([args.json])
    status = StatusLine()
    try:
        summary = run_pipeline(config, status)
    finally:
        status.end()
    print_summary(summary)
    if len(summary["streams"]) > 1:
        for name, st in summary["streams"].items():
            print(f"  {name}: {st['ok'] + st['defect'] + st['error']} results: {st['ok']} ok, {st['defect']} defect, "
                  f"{st['error']} error ({len(st['lost'])} lost)")
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_bench(args) -> int:
    from pipeline.benchmark import benchmark

    ready_to_write([args.json])
    result = benchmark(args.model, _deployment(args), frames=args.frames, batch=args.batch_size,
                       transport_frames=args.transport_frames)
    c, p, t = result["compute"], result["pipeline"], result["transport"]
    print(f"bare compute   {c['fps']:7.1f} fps  (batch {c['batch']}, {c['kind']} detector {c['ms_per_frame']:.1f} ms "
          f"per frame)")
    print(f"pipeline       {p['fps']:7.1f} fps  latency p50 {p['latency_ms']['p50']:.1f} ms p99 "
          f"{p['latency_ms']['p99']:.1f} ms  ({p['results']} results, {p['error']} errors)")
    print(f"efficiency     {result['efficiency']:.3f}  (pipeline / bare compute)")
    print(f"transport      {t['wire_fps']:.0f} vs {t['raw_fps']:.0f} frames/s of 1920x1080 RGB over ipc: "
          f"ratio {t['ratio']:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_export(args) -> int:
    from calibration.model import Model
    from engines.runtimes import runtime

    model = Model(args.model)
    _deployment(args)  # the runtime, precision, device and extras, checked before anything is built
    if args.precision not in runtime(args.runtime).compiled:
        print(f"the {args.runtime} runtime runs {args.precision} straight from {args.model}/model.onnx or the network; "
              "nothing to build")
        return 0
    if args.runtime == "onnxruntime":
        from calibration.int8 import Int8Config, quantize_onnxruntime

        records = quantize_onnxruntime(args.model, Int8Config(args.calibration, not args.per_tensor, args.calib_images),
                                       data=args.data)
        for r in records:
            v = r["validation"]
            print(f"wrote {r['engine']} ({r['method']}, {'per-channel' if r['per_channel'] else 'per-tensor'}, "
                  f"{len(r['calibration_images'])} calibration images, {r['seconds']} s); validated on "
                  f"{', '.join(r['cpu_features'])}: map correlation {v['map_correlation']:.3f}, pixel AUROC "
                  f"{v['pixel_auroc'][0]:.4f} -> {v['pixel_auroc'][1]:.4f}")
        return 0
    from calibration.int8 import calibration_batches, calibration_images
    from engines.compiled import engine_path
    from engines.tensorrt import build_plan

    for part in model.kind.parts(model.dir, model.manifest):
        calibration = None
        if args.precision == "int8":
            calibration = calibration_batches(part, calibration_images(part, args.calib_images, args.data), batch=8)
        plan = build_plan(part / "model.onnx", engine_path(part, "tensorrt", args.precision), model.spec.height,
                          model.spec.width, args.precision, args.max_batch, calibration)
        print(f"wrote {plan}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the `command` being run, fit's options only when it is fit: they
    name choices from modules that import torch and onnx (2.4 s), which the pipeline's stage processes
    (produce, sink, postprocess) never need."""
    from calibration.ensemble import FUSIONS
    from engines.runtimes import PRECISIONS, RUNTIMES

    parser = argparse.ArgumentParser(prog="lineguard", description="Streaming visual inspection.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--runtime", choices=list(RUNTIMES), default="onnxruntime", help="inference runtime")
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="onnxruntime: fp32 | int8 (after lineguard export); torch: fp32 | fp16 (CUDA); tensorrt: all")
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        p.add_argument("--cuda-graphs", action="store_true", help="torch on CUDA: replay captured CUDA graphs")
        p.add_argument("--batch-size", type=_positive_int, default=8)
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads (default: all cores; run: per inference worker, the cores shared among them)")
        p.add_argument("--deployment", default=None, help=argparse.SUPPRESS)  # the JSON of a Deployment

    fit = sub.add_parser("fit", help="fit a model on DATA/train/good (several DATA: one multi-class model)")
    if command in (None, "fit"):
        _fit_options(fit)
    common(fit)
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="score MODEL on DATA/test (several DATA: per category and their mean)")
    ev.add_argument("model", type=Path, help="model directory written by fit or fuse")
    ev.add_argument("data", type=Path, nargs="+", help="dataset folder(s) in MVTec AD layout")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here, ROC / PRO curve PNGs beside")
    ev.add_argument("--maps", type=Path, default=None, help="write overlays (JPEG) here")
    ev.add_argument("--scores", type=Path, default=None, help="write float32 TIFF score maps here")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    fuse = sub.add_parser("fuse", help="one model from several fitted models of the same input, maps fused")
    fuse.add_argument("models", type=Path, nargs="+")
    fuse.add_argument("-o", "--output", type=Path, required=True)
    fuse.add_argument("--fusion", choices=FUSIONS, default="mean")
    fuse.set_defaults(func=cmd_fuse)

    export = sub.add_parser("export", help="compile MODEL for a runtime and precision (engines/ folder)")
    export.add_argument("model", type=Path)
    export.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax",
                        help="int8 activation range method")
    export.add_argument("--per-tensor", action="store_true", help="int8: one weight scale per tensor, not per channel")
    export.add_argument("--calib-images", type=_positive_int, default=32, help="normal training images to calibrate on")
    export.add_argument("--data", type=Path, default=None, help="the training data, if it moved since fit")
    export.add_argument("--max-batch", type=_positive_int, default=32, help="tensorrt: largest batch")
    common(export)
    export.set_defaults(func=cmd_export)

    run = sub.add_parser("run", help="run the streaming pipeline on a source until it ends")
    run.add_argument("model", type=Path, nargs="?", default=None, help="the model (or --line)")
    run.add_argument("--line", type=Path, default=None,
                     help="a line file (TOML): every stream, its source and product model (pipeline/linefile.py)")
    run.add_argument("--source", default="synthetic",
                     help="synthetic | a folder of images | a video file | camera:N | rtsp://...")
    run.add_argument("--frames", type=int, default=0, help="frames to take from the source (0: all; synthetic: 300)")
    run.add_argument("--out", type=Path, default=None, help="results.jsonl, maps/ and overlays/ go here")
    run.add_argument("--json", type=Path, default=None, help="write the summary here")
    run.add_argument("--workers", type=_count, default=0,
                     help="inference worker processes (default 0: one per core on the CPU, one on a GPU)")
    run.add_argument("--post-workers", type=_positive_int, default=1, help="postprocess worker processes")
    run.add_argument("--batch-ms", type=float, default=10.0, help="longest wait to fill a batch")
    run.add_argument("--mode", choices=("lossless", "live"), default=None, help="default: live for cameras")
    run.add_argument("--stream", default="cam0")
    run.add_argument("--camera", default="", help=CAMERA_HELP)
    run.add_argument("--pub", default=None, help="also publish results on this ZeroMQ endpoint (PUB, bound)")
    run.add_argument("--drain-timeout", type=float, default=5.0,
                     help="seconds without results after the end of stream before missing frames count as lost")
    run.add_argument("--retry-after", type=float, default=10.0,
                     help="seconds without a verdict before the producer sends a frame again")
    run.add_argument("--no-respawn", action="store_true", help="do not restart stages that die")
    run.add_argument("--ready-timeout", type=float, default=120.0,
                     help="seconds every stage may take to load and warm up before the run gives up")
    run.add_argument("--view-port", type=int, default=None, help="serve the live web view at http://HOST:PORT/")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="Prometheus: the run on PORT, the sink on PORT+1, the producer PORT+2, then the workers")
    common(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="bare compute vs the whole pipeline, and the transport alone")
    bench.add_argument("model", type=Path)
    bench.add_argument("--frames", type=_positive_int, default=500)
    bench.add_argument("--transport-frames", type=_positive_int, default=300)
    bench.add_argument("--json", type=Path, default=None)
    common(bench)
    bench.set_defaults(func=cmd_bench)

    def stage_options(stage: argparse.ArgumentParser) -> None:
        stage.add_argument("--keys", type=Path, default=None,
                           help="CURVE: the folder of `lineguard keys` (this role's secret key, the others' public keys)")
        stage.add_argument("--metrics-port", type=int, default=None,
                           help="serve Prometheus metrics at http://HOST:PORT/metrics")

    produce = sub.add_parser("produce", help="one stage: send a source's frames (PUSH, bound)")
    produce.add_argument("source")
    produce.add_argument("--frames-endpoint", required=True, help="e.g. tcp://*:5555")
    produce.add_argument("--sink", required=True, help="the sink's results endpoint, for end of stream")
    produce.add_argument("--stream", default="cam0")
    produce.add_argument("--frames", type=int, default=0)
    produce.add_argument("--mode", choices=("lossless", "live"), default=None)
    produce.add_argument("--size", type=_positive_int, default=256, help="synthetic frame size")
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument("--camera", default="", help=CAMERA_HELP)
    produce.add_argument("--acks", default=None,
                         help="the sink's --acks endpoint: keep every frame until its verdict, send again if none comes")
    produce.add_argument("--retry-after", type=float, default=10.0,
                         help="seconds before a frame is sent again (doubling with each send)")
    produce.add_argument("--window", type=_positive_int, default=64,
                         help="with --acks: the most frames awaiting their verdicts (run: 8 batches per inference "
                              "worker); a full window holds the source back")
    produce.add_argument("--hold", type=float, default=30.0,
                         help="seconds to stay connected after the end of stream, so frames in flight arrive")
    stage_options(produce)
    produce.set_defaults(func=cmd_produce)

    worker = sub.add_parser("worker", help="one stage: an inference worker")
    worker.add_argument("model", type=Path)
    worker.add_argument("--frames", required=True, action="append",
                        help="a producer's endpoint (connect); repeat it for several producers")
    worker.add_argument("--out", required=True, action="append", help="postprocess endpoint(s) (connect)")
    worker.add_argument("--batch-ms", type=float, default=10.0)
    worker.add_argument("--control", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--name", default="infer0")
    common(worker)
    stage_options(worker)
    worker.set_defaults(func=cmd_worker)

    post = sub.add_parser("postprocess", help="one stage: a postprocess worker")
    post.add_argument("model", type=Path)
    post.add_argument("--in", dest="inp", required=True, help="endpoint to bind, e.g. tcp://*:5556")
    post.add_argument("--sink", required=True, help="the sink's results endpoint (connect)")
    post.add_argument("--overlays", type=Path, default=None, help="write overlays (JPEG) of defective frames here")
    post.add_argument("--no-maps", action="store_true", help="do not attach defect maps to results")
    post.add_argument("--control", default=None, help=argparse.SUPPRESS)
    post.add_argument("--name", default="post0")
    stage_options(post)
    post.set_defaults(func=cmd_postprocess)

    sink = sub.add_parser("sink", help="one stage: collect, order and write results")
    sink.add_argument("--results", required=True, help="endpoint to bind, e.g. tcp://*:5557")
    sink.add_argument("--pub", default=None, help="publish results here (PUB, bound)")
    sink.add_argument("--jsonl", type=Path, default=None)
    sink.add_argument("--maps", type=Path, default=None, help="write defect maps of defective frames here")
    sink.add_argument("--streams", type=int, default=0, help="stop after this many streams ended (0: never)")
    sink.add_argument("--drain-timeout", type=float, default=5.0)
    sink.add_argument("--summary", type=Path, default=None)
    sink.add_argument("--acks", default=None, help="publish acknowledgements here for producers (PUB, bound)")
    sink.add_argument("--resume", action="store_true", help="continue an existing --jsonl log (after a restart)")
    sink.add_argument("--view-port", type=int, default=None, help="serve the live web view at http://HOST:PORT/")
    sink.add_argument("--overlays", type=Path, default=None,
                      help="where the postprocess workers write overlays (the view shows the latest)")
    sink.add_argument("--model", action="append", default=None,
                      help="MODEL or STREAM=MODEL (repeat for several streams): watch each stream's scores for "
                           "drift from its model's calibration")
    sink.add_argument("--control", default=None, help=argparse.SUPPRESS)
    stage_options(sink)
    sink.set_defaults(func=cmd_sink)

    cameras = sub.add_parser("cameras", help="list the GenICam cameras (GigE Vision, USB3 Vision) Aravis finds")
    cameras.set_defaults(func=cmd_cameras)

    keys = sub.add_parser("keys", help="write CURVE key pairs for the stages of a line on several hosts")
    keys.add_argument("folder", type=Path)
    keys.set_defaults(func=cmd_keys)

    demo = sub.add_parser("demo", help="fit and evaluate on a built-in synthetic product (no data needed)")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="where data, model and maps go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--frames", type=_positive_int, default=300, help="synthetic frames to stream")
    demo.set_defaults(func=cmd_demo)
    return parser


def _fit_options(fit: argparse.ArgumentParser) -> None:
    from calibration.fit import FitConfig
    from calibration.geometry import JPEG_DECODES, PHOTOMETRICS, Geometry
    from calibration.kinds import kind_names
    from calibration.maps import IMAGE_SCORES, MapConfig
    from calibration.memory_bank import AUGMENTS
    from engines.backbones import backbone_names
    from engines.banks import HNSW_STORAGES, INDEX_KINDS
    from engines.head_config import POOL_PADDINGS, PROJECTIONS, WEIGHTINGS

    fit.add_argument("data", type=Path, nargs="+", help="dataset folder(s) in MVTec AD layout")
    fit.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    fit.add_argument("--kind", default="memory_bank", help=f"model kind: {', '.join(kind_names())}")
    g = fit.add_argument_group("input and geometry (every kind)")
    g.add_argument("--input-size", type=_input_size, default=None,
                   help="S or HxW, multiples of 32 (default: the training images' aspect ratio at about 256x256)")
    g.add_argument("--tiles", action="store_true", help="cover each frame with overlapping input-size tiles")
    g.add_argument("--tile-scale", type=float, default=1.0, help="with --tiles: input pixels per frame pixel")
    g.add_argument("--tile-overlap", type=float, default=0.25, help="with --tiles: least shared fraction of a tile")
    g.add_argument("--roi", default=None, help="region of interest: x,y,w,h in frame pixels, or a mask image")
    g.add_argument("--photometric", choices=PHOTOMETRICS, default=Geometry.photometric,
                   help="frame: each frame standardised to one brightness and contrast; none: pixels as they come")
    g.add_argument("--jpeg-decode", choices=JPEG_DECODES, default=Geometry.jpeg_decode,
                   help="scaled: a JPEG frame twice the input's size or more is decoded at 1/2, 1/4 or 1/8 (faster); "
                        "full: at its own size")
    g.add_argument("--backbone", default=None, help=f"default efficientnet_lite0; one of {', '.join(backbone_names())}")
    g.add_argument("--weights", default=None, help="backbone checkpoint path (default: installed weights)")
    g.add_argument("--layers", type=_layers, default=None, help="comma-separated backbone stages")
    g = fit.add_argument_group("maps and thresholds (every kind)")
    g.add_argument("--blur-sigma", type=float, default=MapConfig.blur_sigma, help="map smoothing, input pixels")
    g.add_argument("--image-score", choices=IMAGE_SCORES, default=MapConfig.image_score)
    g.add_argument("--top-k", type=_positive_int, default=MapConfig.top_k, help="cells averaged by --image-score topk")
    g.add_argument("--border-rings", type=int, default=MapConfig.border_rings,
                   help="outer rings of map cells whose normal scores fit evens out to the interior's (0: none)")
    g.add_argument("--calib-images", type=_positive_int, default=FitConfig.calib_images,
                   help="held-out normal images that calibrate the thresholds, at most")
    g.add_argument("--max-false-reject", type=float, default=None,
                   help="false-reject target on normal frames, e.g. 0.01 (default: the largest normal score)")
    g.add_argument("--seed", type=int, default=0)
    g = fit.add_argument_group("memory_bank kind")
    g.add_argument("--weighting", choices=WEIGHTINGS, default=None, help="stage weighting in the embedding")
    g.add_argument("--context", type=int, default=None, help="mirrored border pixels seen around each input")
    g.add_argument("--pool-padding", choices=POOL_PADDINGS, default=None,
                   help="3x3 patch averaging at the border: include the zero padding (damps border patches) | exclude it")
    g.add_argument("--dim", type=int, default=None, help="embedding size (0: all channels)")
    g.add_argument("--projection", choices=PROJECTIONS, default=None, help="how --dim is reached: pca (learned) | random")
    g.add_argument("--coreset-ratio", type=float, default=None, help="fraction of training patches in the bank")
    g.add_argument("--coreset-max", type=int, default=None, help="largest bank size (0: no limit); bounds search time")
    g.add_argument("--index", choices=INDEX_KINDS, default=None, help="auto (default: hnsw or ivf, whichever searches faster on this CPU, timed at fit) | flat (exact) | ivf | hnsw")
    g.add_argument("--nlist", type=_count, default=None, help="ivf lists (0: one per 256 bank vectors)")
    g.add_argument("--nprobe", type=_positive_int, default=None,
                   help="ivf lists searched per query: more is nearer exact and slower (bench.bank_search)")
    g.add_argument("--ef-construction", type=_positive_int, default=None, help="hnsw candidates per insertion")
    g.add_argument("--hnsw-storage", choices=HNSW_STORAGES, default=None,
                   help="hnsw vectors in fp16 (default: half the memory searched, faster) or fp32")
    g.add_argument("--ef-search", type=_positive_int, default=None,
                   help="hnsw candidates per query: more is nearer exact and slower (bench.bank_search)")
    g.add_argument("--rerank", type=_count, default=None,
                   help="ivf / hnsw: the highest cells of each map searched again exactly (0: none)")
    g.add_argument("--shots", type=int, default=None, help="few-shot: a bank from K normal images and their views")
    g.add_argument("--augment", choices=AUGMENTS, default=None, help="few-shot views of each image (default flips)")
    g = fit.add_argument_group("reconstruction kind")
    g.add_argument("--steps", type=int, default=None, help="training steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the cached encoder features")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--max-minutes", type=float, default=None, help="bound on the training time")
    g.add_argument("--holdout", type=float, default=None, help="share of each dataset held out for calibration")
    g.add_argument("--decoder-width", type=_positive_int, default=None, help="decoder channels")
    g.add_argument("--flip-features", action="store_true", default=None, help="augment by flipping feature maps")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    from pipeline.run import follow_supervisor

    follow_supervisor()
    try:
        return args.func(args)
    except LineguardError as exc:
        if args.debug:
            raise
        print(f"lineguard: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # what the system refused: a path (missing folder, no permission, read-only), a full disk
        if args.debug:
            raise
        if exc.filename is None:  # a write to a full disk or a failing device names no file
            fix = {errno.ENOSPC: "free space on the disk and run again; ", errno.EDQUOT: "free space within your "
                   "quota and run again; ", errno.EIO: "check the disk and run again; "}.get(exc.errno, "")
            print(f"lineguard: error: {exc.strerror or exc}; {fix}--debug shows where", file=sys.stderr)
            return 2
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"lineguard: error: {paths}: {exc.strerror or exc}; check the path and its permissions, or give "
              "another (--debug shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lineguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
