"""Fit and evaluate on the real datasets in ../shared/data as a user does (`lineguard fit` + `eval`);
write bench/results/accuracy-<dataset>[-<tag>].json with the options, the metrics and the machine.

    python -m bench.accuracy                                     # every dataset, default settings
    python -m bench.accuracy --datasets magnetic_tile/tile --tag lite2 -- --backbone efficientnet_lite2
    python -m bench.accuracy --kind reconstruction --tag rec      # any `lineguard fit` option after --
    python -m bench.accuracy --protocol crop                      # the peer's centre crop (224 of 256)
    python -m bench.accuracy --protocol train-every-4 --datasets magnetic_tile/tile   # the peer's subset
    python -m bench.accuracy --protocol enlarge-4 --datasets mvtec_subset/hazelnut -- --jpeg-decode full

Protocols: "full" (the product's figure: every frame whole); "crop" (each train and test image
and mask resized to 256 x 256 and cropped to its centre 224 x 224 before fitting: anomalib's
protocol with `center_crop_size`, for comparison only); "train-every-4" (fit on every 4th training
image in name order, evaluate on the whole test set: the subset shared/PEER.md scores the peer on);
"enlarge-4" (every image enlarged 4x and saved as a baseline JPEG, masks enlarged alike: large camera
frames, where a JPEG is decoded at a reduced scale, `--jpeg-decode`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2

from calibration.artifact import machine_info
from pipeline.cli import main as lineguard

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
DATASETS = ("mvtec_subset/hazelnut", "mpdd/metal_plate", "magnetic_tile/tile")


def centre_crop_copy(data: Path, out: Path, resize: int = 256, crop: int = 224) -> Path:
    """A copy of an MVTec-layout dataset with every image and mask resized to `resize` and centre-cropped."""
    lo = (resize - crop) // 2
    for path in sorted(data.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            continue
        mask = "ground_truth" in path.parts
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        image = cv2.resize(image, (resize, resize), interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_AREA)
        target = out / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target.with_suffix(".png")), image[lo:lo + crop, lo:lo + crop])
    return out


def enlarged_copy(data: Path, out: Path, factor: int = 4) -> Path:
    """A copy of an MVTec-layout dataset with every image enlarged `factor` times (bicubic) and saved as a
    baseline JPEG of quality 95, every mask enlarged (nearest) as PNG: frames as a multi-megapixel camera
    saves them (hazelnut's 512 x 512 become 2048 x 2048), for what decoding large JPEG files costs."""
    for path in sorted(data.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            continue
        mask = "ground_truth" in path.parts
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_CUBIC)
        target = out / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        if mask:
            cv2.imwrite(str(target.with_suffix(".png")), image)
        else:
            cv2.imwrite(str(target.with_suffix(".jpg")), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return out


def train_subset_copy(data: Path, out: Path, every: int = 4) -> Path:
    """An MVTec-layout view of `data` (symlinks) whose train/good holds every `every`-th image in name order."""
    train = sorted(p for p in (data / "train" / "good").iterdir() if p.is_file())
    (out / "train" / "good").mkdir(parents=True)
    for path in train[::every]:
        (out / "train" / "good" / path.name).symlink_to(path.resolve())
    for path in sorted(data.rglob("*")):
        if path.is_file() and path.parts[len(data.parts)] in ("test", "ground_truth"):
            target = out / path.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return out


def run(dataset: str, fit_args: list[str], eval_args: list[str], protocol: str = "full", precision: str = "fp32") -> dict:
    """Fit with `fit_args`, export int8 if asked, evaluate with `eval_args`: eval's metrics with the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = DATA / dataset
        if protocol == "crop":
            data = centre_crop_copy(data, tmp / "data")
        elif protocol == "train-every-4":
            data = train_subset_copy(data, tmp / "data")
        elif protocol == "enlarge-4":
            data = enlarged_copy(data, tmp / "data")
        model = tmp / "model"
        start = time.perf_counter()
        if lineguard(["fit", str(data), "-o", str(model), *fit_args]) != 0:
            raise SystemExit(f"fit failed on {dataset}")
        fit_seconds = time.perf_counter() - start
        if precision == "int8" and lineguard(["export", str(model), "--precision", "int8"]) != 0:
            raise SystemExit(f"int8 export failed on {dataset}")
        if lineguard(["eval", str(model), str(data), "--json", str(tmp / "m.json"), "--precision", precision,
                      *eval_args]) != 0:
            raise SystemExit(f"eval failed on {dataset}")
        result = json.loads((tmp / "m.json").read_text())
        manifest = json.loads((model / "manifest.json").read_text())
    for m in result["categories"].values():
        m.pop("curves", None)
    result.pop("curve_plots", None)
    return {"dataset": dataset, "protocol": protocol, "fit_args": fit_args, "eval_args": eval_args,
            "fit_wall_seconds": round(fit_seconds, 2), "metrics": {k: v for k, v in result.items() if k != "config"},
            "manifest": {k: manifest[k] for k in ("kind", "input", "geometry", "maps", manifest["kind"], "fit")},
            "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--protocol", choices=("full", "crop", "train-every-4", "enlarge-4"), default="full")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="onnxruntime engine of eval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("fit_args", nargs="*", help="lineguard fit options (after --)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fit_args = [*args.fit_args, "--threads", str(args.threads)]
    eval_args = ["--threads", str(args.threads)]
    for dataset in args.datasets:
        result = run(dataset, fit_args, eval_args, args.protocol, args.precision)
        tag = "-".join(t for t in (args.protocol if args.protocol != "full" else "", args.precision
                                   if args.precision != "fp32" else "", args.tag) if t)
        name = dataset.split("/")[-1] + (f"-{tag}" if tag else "")
        (RESULTS / f"accuracy-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        m, f = result["metrics"], result["manifest"]["fit"]
        print(f"{dataset:<24} image AUROC {m['image_auroc']:.4f}  pixel AUROC {m['pixel_auroc']:.4f}  "
              f"AU-PRO {m['pixel_aupro']:.4f}  fit {f['fit_seconds']:.1f} s  {m['images_per_s']:.1f} images/s  "
              f"[{result['manifest']['kind']} {' '.join(args.fit_args)}]", flush=True)


if __name__ == "__main__":
    main()
