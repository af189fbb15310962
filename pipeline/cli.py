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


def _layers(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


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
        calib_images=args.calib_images, runtime=args.runtime, batch_size=args.batch_size,
        threads=args.threads, seed=args.seed,
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

    model = InspectionModel(args.model, runtime=args.runtime, threads=args.threads)
    result = evaluate(model, args.data, batch_size=args.batch_size, maps_dir=args.maps, scores_dir=args.scores,
                      progress=ProgressBar())
    fit_info = model.manifest["fit"]
    result["config"] = {
        "model": str(args.model), "data": str(args.data), "runtime": args.runtime,
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    """Synthetic product with planted defects -> fit -> eval with defect-map overlays."""
    from calibration.synthetic import make_dataset

    out = args.out
    data = make_dataset(out / "data", seed=args.seed)
    print(f"wrote a synthetic dataset with planted defects to {data}")
    code = main(["fit", str(data), "-o", str(out / "model"), "--seed", str(args.seed)])
    if code:
        return code
    return main(["eval", str(out / "model"), str(data), "--json", str(out / "metrics.json"),
                 "--maps", str(out / "maps"), "--scores", str(out / "scores")])


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

    demo = sub.add_parser("demo", help="fit and evaluate on a built-in synthetic product (no data needed)")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="where data, model and maps go")
    demo.add_argument("--seed", type=int, default=0)
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
