#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call from the repository root:
#   build the CUDA extension, run the tests on the GPU (every backend), run the benchmarks,
#   write bench/results/<device>.json and the logs under $OUT.
# Optional wheels the machine lacks (liger-kernel, pure Python) travel in .whl/ (see bench/README.md).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== build appo_kernels._C"
if ! APPO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build failed: the tests below run without the CUDA backend"
fi
python3 -c "import appo_kernels; print(appo_kernels.backend_info())" | tee "$OUT/backend.txt"

echo "== tests on the GPU"
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== benchmarks"
python3 -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -8
python3 bench/report.py "$OUT/bench.json" | tee "$OUT/table.md"
cp bench/results/*.json "$OUT/" 2>/dev/null || true
