"""The `lineguard` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engines.errors import LineguardError

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second; silent when not a terminal."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self.last = 0.0
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage == self.stage and done < total and now - self.last < 0.1:
            return
        self.last, self.stage = now, stage
        filled = int(30 * done / max(total, 1))
        self.stream.write(f"\r{stage:>10} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


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


def _deployment(args):
    from calibration.model import Deployment

    return Deployment(runtime=args.runtime, precision=args.precision, device=args.device, threads=args.threads,
                      cuda_graphs=args.cuda_graphs, bank_precision=args.bank_precision)


def cmd_fit(args) -> int:
    from calibration.fit import FitConfig, fit
    from calibration.model import ScoringConfig
    from engines.banks import BankConfig
    from engines.heads import EmbeddingConfig

    config = FitConfig(
        embedding=EmbeddingConfig(backbone=args.backbone, layers=args.layers, input_size=args.input_size,
                                  dim=args.dim, seed=args.seed),
        bank=BankConfig(index=args.index),
        scoring=ScoringConfig(reweight_k=args.reweight, blur_sigma=args.blur_sigma),
        weights=args.weights, coreset_ratio=args.coreset_ratio, coreset_max=args.coreset_max,
        calib_images=args.calib_images, deployment=_deployment(args), batch_size=args.batch_size, seed=args.seed,
    )
    summary = fit(args.data, args.output, config, progress=ProgressBar())
    print(f"fitted {args.output}: {summary['train_images']} images, {summary['patches']} patches -> bank "
          f"{summary['bank_size']} x {summary['dim']} ({config.bank.index}), grid {summary['grid'][0]}x"
          f"{summary['grid'][1]}, {summary['fit_seconds']:.1f} s (extract {summary['extract_seconds']:.1f} s, "
          f"coreset {summary['coreset_seconds']:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from calibration.evaluate import evaluate
    from calibration.model import InspectionModel

    model = InspectionModel(args.model, _deployment(args))
    result = evaluate(model, args.data, batch_size=args.batch_size, maps_dir=args.maps, scores_dir=args.scores,
                      progress=ProgressBar())
    fit_info = model.manifest["fit"]
    result["config"] = {
        "model": str(args.model), "data": str(args.data), "runtime": args.runtime, "precision": args.precision,
        "device": args.device,
        "backbone": model.embedding.backbone, "layers": list(model.embedding.layers),
        "input_size": model.embedding.input_size, "dim": model.manifest["feature_dim"],
        "coreset_ratio": fit_info["coreset_ratio"], "bank_size": model.bank.size, "index": model.bank.config.index,
        "fit_seconds": fit_info["fit_seconds"], "batch_size": args.batch_size, "threads": args.threads,
    }
    print(f"{'metric':<14}{'value':>8}")
    for key in METRIC_KEYS:
        print(f"{key:<14}{result[key]:>8.4f}")
    print(f"{'images/s':<14}{result['images_per_s']:>8.1f}   ({result['n_images']} images, "
          f"{result['n_defective']} defective)")
    if args.json:
        write_json(args.json, result)
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
    import threading

    from pipeline.producers import open_source, produce
    from pipeline.workers import stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop)
    source = open_source(args.source, frames=args.frames, size=args.size, seed=args.seed)
    stats = produce(source, args.frames_endpoint, args.sink, stream=args.stream, mode=args.mode, hold=args.hold,
                    stop=stop)
    print(f"produced {stats.sent} frames on {args.stream} ({stats.dropped} dropped)", file=sys.stderr)
    return 0


def cmd_worker(args) -> int:
    from pipeline.workers import inference_worker

    stats = inference_worker(args.model, args.frames, args.out, deployment=_deployment(args), batch=args.batch_size, batch_ms=args.batch_ms, control=args.control, name=args.name)
    print(f"{args.name}: {stats.frames} frames in {stats.batches} batches, rejected {stats.rejected}", file=sys.stderr)
    return 0


def cmd_postprocess(args) -> int:
    from pipeline.workers import postprocess_worker

    stats = postprocess_worker(args.model, args.inp, args.sink, overlays=args.overlays, attach_maps=not args.no_maps,
                               control=args.control, name=args.name)
    print(f"{args.name}: {stats.frames} frames, rejected {stats.rejected}", file=sys.stderr)
    return 0


def cmd_sink(args) -> int:
    from pipeline.sinks import run_sink

    summary = run_sink(args.results, pub_endpoint=args.pub, jsonl=args.jsonl, maps_dir=args.maps,
                       streams=args.streams, drain_timeout=args.drain_timeout, control=args.control)
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
                              f"drops {s['dropped']:>5} | errors {s['error']:>5}")
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
    if summary.get("rejected"):
        print(f"rejected messages: {summary['rejected']}")
    for restart in summary.get("worker_restarts", []):
        print(f"inference worker {restart['worker']} died (exit {restart['exit_code']}) and was restarted")


def cmd_run(args) -> int:
    from pipeline.run import RunConfig, run_pipeline

    config = RunConfig(model=args.model, source=args.source, out=args.out, frames=args.frames, workers=args.workers,
                       post_workers=args.post_workers, batch=args.batch_size, batch_ms=args.batch_ms,
                       deployment=_deployment(args), mode=args.mode, stream=args.stream, pub=args.pub,
                       drain_timeout=args.drain_timeout, respawn=not args.no_respawn)
    status = StatusLine()
    try:
        summary = run_pipeline(config, status)
    finally:
        status.end()
    print_summary(summary)
    if args.json:
        write_json(args.json, summary)
    return 0


def cmd_bench(args) -> int:
    from pipeline.benchmark import benchmark

    result = benchmark(args.model, _deployment(args), frames=args.frames, batch=args.batch_size,
                       transport_frames=args.transport_frames)
    c, p, t = result["compute"], result["pipeline"], result["transport"]
    print(f"bare compute   {c['fps']:7.1f} fps  (batch {c['batch']}, engine {c['engine_ms_per_frame']:.1f} ms + "
          f"bank {c['bank_ms_per_frame']:.1f} ms per frame)")
    print(f"pipeline       {p['fps']:7.1f} fps  latency p50 {p['latency_ms']['p50']:.1f} ms p99 "
          f"{p['latency_ms']['p99']:.1f} ms  ({p['results']} results, {p['error']} errors)")
    print(f"efficiency     {result['efficiency']:.3f}  (pipeline / bare compute)")
    print(f"transport      {t['wire_fps']:.0f} vs {t['raw_fps']:.0f} frames/s of 1920x1080 RGB over ipc: "
          f"ratio {t['ratio']:.3f}")
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_export(args) -> int:
    from calibration.artifact import load_manifest

    manifest = load_manifest(args.model)
    if args.runtime == "onnxruntime":
        from calibration.int8 import Int8Config, quantize_onnxruntime

        if args.precision != "int8":
            print(f"{args.model}/model.onnx is the onnxruntime fp32 engine; nothing to build")
            return 0
        record = quantize_onnxruntime(args.model, Int8Config(args.calibration, not args.per_tensor, args.calib_images),
                                      data=args.data)
        print(f"wrote {args.model}/engines/onnxruntime-int8.onnx ({record['method']}, "
              f"{'per-channel' if record['per_channel'] else 'per-tensor'}, "
              f"{len(record['calibration_images'])} calibration images, {record['seconds']} s)")
        return 0
    if args.runtime == "tensorrt":
        from calibration.int8 import calibration_batches, calibration_images
        from engines.runtimes import check_runtime
        from engines.tensorrt import build_plan, plan_path

        check_runtime("tensorrt", args.precision)
        size = manifest["embedding"]["input_size"]
        calibration = None
        if args.precision == "int8":
            calibration = calibration_batches(calibration_images(args.model, args.calib_images, args.data), size,
                                              batch=8)
        plan = build_plan(args.model / "model.onnx", plan_path(args.model, args.precision), size, args.precision,
                          args.max_batch, calibration)
        print(f"wrote {plan}")
        return 0
    print("the torch runtime needs no export: it runs the network directly (--runtime torch)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from calibration.fit import FitConfig
    from calibration.model import ScoringConfig
    from engines.banks import INDEX_KINDS, BankConfig
    from engines.heads import EmbeddingConfig
    from engines.runtimes import RUNTIMES

    parser = argparse.ArgumentParser(prog="lineguard", description="Streaming visual inspection.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help="inference runtime")
        p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="onnxruntime: fp32 | int8 (after lineguard export); torch: fp32 | fp16 (CUDA); tensorrt: all")
        p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        p.add_argument("--cuda-graphs", action="store_true", help="torch on CUDA: replay captured CUDA graphs")
        p.add_argument("--bank-precision", choices=("fp32", "fp16"), default="fp32",
                       help="flat bank search products: fp32, or fp16 (GPU)")
        p.add_argument("--batch-size", type=_positive_int, default=8)
        p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")

    fit = sub.add_parser("fit", help="fit a memory-bank model on DATA/train/good")
    fit.add_argument("data", type=Path, help="dataset folder in MVTec AD layout")
    fit.add_argument("-o", "--output", type=Path, required=True, help="model directory to write")
    fit.add_argument("--backbone", default=EmbeddingConfig.backbone)
    fit.add_argument("--weights", default=None, help="backbone checkpoint path (default: installed weights)")
    fit.add_argument("--layers", type=_layers, default=EmbeddingConfig.layers, help="comma-separated stages")
    fit.add_argument("--input-size", type=int, default=EmbeddingConfig.input_size)
    fit.add_argument("--dim", type=int, default=EmbeddingConfig.dim, help="embedding size (0: all channels)")
    fit.add_argument("--coreset-ratio", type=float, default=FitConfig.coreset_ratio)
    fit.add_argument("--coreset-max", type=int, default=FitConfig.coreset_max,
                     help="largest bank size (0: no limit); bounds search time")
    fit.add_argument("--index", choices=INDEX_KINDS, default=BankConfig.index)
    fit.add_argument("--reweight", type=int, default=ScoringConfig.reweight_k,
                     help="PatchCore image-score reweighting k (0: off)")
    fit.add_argument("--blur-sigma", type=float, default=ScoringConfig.blur_sigma)
    fit.add_argument("--calib-images", type=_positive_int, default=FitConfig.calib_images)
    fit.add_argument("--seed", type=int, default=0)
    common(fit)
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="score MODEL on DATA/test and print metrics")
    ev.add_argument("model", type=Path, help="model directory written by fit")
    ev.add_argument("data", type=Path, help="dataset folder in MVTec AD layout")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here")
    ev.add_argument("--maps", type=Path, default=None, help="write overlay PNGs here")
    ev.add_argument("--scores", type=Path, default=None, help="write float32 TIFF score maps here")
    common(ev)
    ev.set_defaults(func=cmd_eval)

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
    run.add_argument("model", type=Path)
    run.add_argument("--source", default="synthetic",
                     help="synthetic | a folder of images | a video file | camera:N | rtsp://...")
    run.add_argument("--frames", type=int, default=0, help="frames to take from the source (0: all; synthetic: 300)")
    run.add_argument("--out", type=Path, default=None, help="results.jsonl, maps/ and overlays/ go here")
    run.add_argument("--json", type=Path, default=None, help="write the summary here")
    run.add_argument("--workers", type=_positive_int, default=1, help="inference worker processes")
    run.add_argument("--post-workers", type=_positive_int, default=1, help="postprocess worker processes")
    run.add_argument("--batch-ms", type=float, default=10.0, help="longest wait to fill a batch")
    run.add_argument("--mode", choices=("lossless", "live"), default=None, help="default: live for cameras")
    run.add_argument("--stream", default="cam0")
    run.add_argument("--pub", default=None, help="also publish results on this ZeroMQ endpoint (PUB, bound)")
    run.add_argument("--drain-timeout", type=float, default=5.0,
                     help="seconds without results after the end of stream before missing frames count as lost")
    run.add_argument("--no-respawn", action="store_true", help="do not restart inference workers that die")
    common(run)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="bare compute vs the whole pipeline, and the transport alone")
    bench.add_argument("model", type=Path)
    bench.add_argument("--frames", type=_positive_int, default=500)
    bench.add_argument("--transport-frames", type=_positive_int, default=300)
    bench.add_argument("--json", type=Path, default=None)
    common(bench)
    bench.set_defaults(func=cmd_bench)

    produce = sub.add_parser("produce", help="one stage: send a source's frames (PUSH, bound)")
    produce.add_argument("source")
    produce.add_argument("--frames-endpoint", required=True, help="e.g. tcp://*:5555")
    produce.add_argument("--sink", required=True, help="the sink's results endpoint, for end of stream")
    produce.add_argument("--stream", default="cam0")
    produce.add_argument("--frames", type=int, default=0)
    produce.add_argument("--mode", choices=("lossless", "live"), default=None)
    produce.add_argument("--size", type=_positive_int, default=256, help="synthetic frame size")
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument("--hold", type=float, default=30.0,
                         help="seconds to stay connected after the end of stream, so frames in flight arrive")
    produce.set_defaults(func=cmd_produce)

    worker = sub.add_parser("worker", help="one stage: an inference worker")
    worker.add_argument("model", type=Path)
    worker.add_argument("--frames", required=True, help="the producer's endpoint (connect)")
    worker.add_argument("--out", required=True, action="append", help="postprocess endpoint(s) (connect)")
    worker.add_argument("--batch-ms", type=float, default=10.0)
    worker.add_argument("--control", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--name", default="infer0")
    common(worker)
    worker.set_defaults(func=cmd_worker)

    post = sub.add_parser("postprocess", help="one stage: a postprocess worker")
    post.add_argument("model", type=Path)
    post.add_argument("--in", dest="inp", required=True, help="endpoint to bind, e.g. tcp://*:5556")
    post.add_argument("--sink", required=True, help="the sink's results endpoint (connect)")
    post.add_argument("--overlays", type=Path, default=None, help="write overlay PNGs of defective frames here")
    post.add_argument("--no-maps", action="store_true", help="do not attach defect maps to results")
    post.add_argument("--control", default=None, help=argparse.SUPPRESS)
    post.add_argument("--name", default="post0")
    post.set_defaults(func=cmd_postprocess)

    sink = sub.add_parser("sink", help="one stage: collect, order and write results")
    sink.add_argument("--results", required=True, help="endpoint to bind, e.g. tcp://*:5557")
    sink.add_argument("--pub", default=None, help="publish results here (PUB, bound)")
    sink.add_argument("--jsonl", type=Path, default=None)
    sink.add_argument("--maps", type=Path, default=None, help="write defect maps of defective frames here")
    sink.add_argument("--streams", type=int, default=0, help="stop after this many streams ended (0: never)")
    sink.add_argument("--drain-timeout", type=float, default=5.0)
    sink.add_argument("--summary", type=Path, default=None)
    sink.add_argument("--control", default=None, help=argparse.SUPPRESS)
    sink.set_defaults(func=cmd_sink)

    demo = sub.add_parser("demo", help="fit and evaluate on a built-in synthetic product (no data needed)")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="where data, model and maps go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--frames", type=_positive_int, default=300, help="synthetic frames to stream")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LineguardError as exc:
        if args.debug:
            raise
        print(f"lineguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lineguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
