"""INT8 on CPUs with and without VNNI: the same int8 engine, its export validation and its accuracy,
natively and on an emulated AVX2-only CPU (QEMU user mode, `qemu-x86_64 -cpu EPYC-Rome`: AMD Zen 2,
AVX2 and FMA, no AVX-512, no VNNI), so both CPU kinds are measured on one machine.

    apt-get install qemu-user && python -m bench.int8_isa [--dataset mvtec_subset/hazelnut]

Writes bench/results/int8-isa-<dataset>.json. ONNX Runtime picks its int8 kernels from CPUID, which
QEMU emulates (and so does lineguard's CPU check, through numpy). A worker on the emulated CPU
would refuse the engine validated natively; the measuring child re-stamps its record on purpose.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.accuracy import DATA, RESULTS
from calibration.artifact import machine_info

EMULATED_CPU = "EPYC-Rome"


def measure(model: Path, data: Path) -> dict:
    """In this process: the export validation's numbers and the evaluation, fp32 against int8."""
    from calibration.evaluate import evaluate
    from calibration.int8 import ValidationBar, validate_int8
    from calibration.model import Model
    from engines.compiled import cpu_features, engine_path, read_record, write_record
    from engines.runtimes import Deployment

    # a worker here would refuse an engine validated on another CPU: this bench measures it on purpose
    path = engine_path(model, "onnxruntime", "int8")
    record = read_record(path)
    write_record(path, {**{k: v for k, v in record.items() if k not in ("sha256", "source_sha256")},
                        "cpu_features": cpu_features()})
    out = {"cpu_features": cpu_features(), "validation": validate_int8(model, ValidationBar())}
    for precision in ("fp32", "int8"):
        r = evaluate(Model(model), data, Deployment(precision=precision))
        out[precision] = {k: r[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mvtec_subset/hazelnut")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    if shutil.which("qemu-x86_64") is None:
        raise SystemExit("bench.int8_isa needs QEMU user mode: apt-get install qemu-user")
    from calibration.int8 import quantize_onnxruntime
    from pipeline.cli import main as lineguard

    data = DATA / args.dataset
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        if lineguard(["fit", str(data), "-o", str(model)]) != 0:
            raise SystemExit("fit failed")
        (record,) = quantize_onnxruntime(model, bar=None)  # the engine as export builds it, kept whatever it scores
        runs = {}
        for name, prefix in (("native", []), (f"emulated {EMULATED_CPU} (AVX2, no VNNI)",
                                              ["qemu-x86_64", "-cpu", EMULATED_CPU])):
            proc = subprocess.run(prefix + [sys.executable, "-m", "bench.int8_isa", "--measure", str(model), str(data)],
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"{name} run failed: {proc.stderr[-2000:]}")
            runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            v = runs[name]["validation"]
            print(f"{name}: validation {'passes' if v['passed'] else 'refuses: ' + '; '.join(v['failures'])}; "
                  f"pixel AUROC fp32 {runs[name]['fp32']['pixel_auroc']:.4f} int8 {runs[name]['int8']['pixel_auroc']:.4f}, "
                  f"AU-PRO {runs[name]['fp32']['pixel_aupro']:.4f} -> {runs[name]['int8']['pixel_aupro']:.4f}",
                  flush=True)
    result = {"dataset": args.dataset, "engine": {k: record[k] for k in ("method", "per_channel", "format", "weights",
                                                                          "activations", "uint8_input")},
              "runs": runs, "machine": machine_info(),
              "cause": "ONNX Runtime's x86 U8S8 kernels without VNNI multiply with vpmaddubsw, which saturates its "
                       "int16 pair sums; VNNI (vpdpbusd) accumulates in int32 and does not"}
    (RESULTS / f"int8-isa-{args.dataset.split('/')[-1]}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
