#!/usr/bin/env bash
# The GPU check, in one go (3 minutes on one H100): CuPy against NumPy, and the race
# against PyTorch CUDA.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with an NVIDIA GPU
#
# 1. Uses the python3 that already has CuPy and PyTorch, or installs into it the CuPy wheel that
#    matches the driver's CUDA major version (cupy-cuda12x or cupy-cuda13x) and torch.
# 2. tests/test_gpu.py: every layer's forward and backward on the GPU against NumPy, training and
#    resume across devices, colorize on the GPU against the CPU (the 'cupy' cases run here; the
#    'stand-in' cases run everywhere).
# 3. bench/bench.py --device gpu: both configurations of the reference network, the U-Net default,
#    and 128x128 batch 64, against PyTorch CUDA with TF32 off.
# 4. bench/colorize_bench.py: colorize.py --device gpu and --device cpu on a 0.8 and a 20 MP photo.
# 5. A summary: device, CuPy and CUDA versions, test result, the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"

if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check: no nvidia-smi: this machine has no NVIDIA driver" >&2
    exit 2
fi
cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
if ! "$PY" -c "import cupy" 2>/dev/null; then
    wheel=cupy-cuda12x; [ "${cuda_major:-12}" -ge 13 ] && wheel=cupy-cuda13x
    echo "gpu_check: installing $wheel (driver CUDA $cuda_major)"
    "$PY" -m pip install -q "$wheel" || { echo "gpu_check: could not install $wheel" >&2; exit 2; }
fi
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch || echo "gpu_check: no torch: the race will be skipped" >&2
"$PY" -m pip install -q numpy pillow tqdm pytest hypothesis 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "== device"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import cupy; print('CuPy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())"
    "$PY" -c "import torch; print('PyTorch', torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null
} | tee "$OUT_DIR/summary.txt"

echo "== tests/test_gpu.py" | tee -a "$OUT_DIR/summary.txt"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cupy 2>&1 | tee "$OUT_DIR/test_gpu.log" | tail -n 15
tail -n 1 "$OUT_DIR/test_gpu.log" >> "$OUT_DIR/summary.txt"

echo "== bench/bench.py --device gpu" | tee -a "$OUT_DIR/summary.txt"
timeout 280 "$PY" bench/bench.py --device gpu --steps 10 --rounds 1 --configs 128x128x16 64x64x32 128x128x64 \
    --nets reference unet 2>&1 | tee "$OUT_DIR/bench_gpu.log" | tail -n 30
tail -n 20 "$OUT_DIR/bench_gpu.log" >> "$OUT_DIR/summary.txt"

echo "== bench/colorize_bench.py --device gpu, then cpu (this machine's CPUs)" | tee -a "$OUT_DIR/summary.txt"
for device in gpu cpu; do
    timeout 50 "$PY" bench/colorize_bench.py --device $device --sizes 1024x768 5472x3648 --runs 2 2>&1 \
        | tee -a "$OUT_DIR/summary.txt"
done

echo "== summary ($OUT_DIR/summary.txt)"
cat "$OUT_DIR/summary.txt"
