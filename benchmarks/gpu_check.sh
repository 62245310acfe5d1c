#!/bin/bash
# One short run on an NVIDIA GPU (H200): the GPU attention tests (cuDNN, pallas_gpu), the attention backends
# at the model's packed shapes, and the real 2B train step's MFU in bf16 (auto attention = cuDNN there, with a
# trace of two steps and its top operations; then with the block-sparse pallas_gpu kernel).
# Uses the machine's own jax/flax/optax (no install). Logs and JSON lines go to $OUT (default /tmp/gpu_check).
#
#     bash benchmarks/gpu_check.sh [seconds]     # total budget, default 600
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
budget=${1:-600}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
step() {   # step NAME SECONDS command...: run with a timeout capped by what is left; log to $OUT/NAME.log
    local name=$1 want=$2; shift 2
    local t; t=$(left); [ "$want" -lt "$t" ] && t=$want
    if [ "$t" -lt 20 ]; then echo "== $name: skipped, ${t}s left" | tee -a "$OUT/summary.txt"; return; fi
    echo "== $name (limit ${t}s)" | tee -a "$OUT/summary.txt"
    timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "   rc $? after $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
    grep -E '^\{' "$OUT/$name.log" | tail -1 | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$OUT/summary.txt"
step mfu 170 $PY benchmarks/mfu.py --full --steps 5 --attn-impl auto --loss-chunk 2048 --profile /tmp/mfu_trace
trace=$(find /tmp/mfu_trace -name '*.trace.json.gz' ! -name 'perfetto*' 2>/dev/null | head -1)
[ -n "$trace" ] && cp "$trace" "$OUT/mfu_trace.json.gz"
step trace_top 60 $PY benchmarks/trace_top.py /tmp/mfu_trace --steps 2 --top 30
step attention 110 $PY benchmarks/attention.py --full --repeats 5 --impls xla cudnn pallas_gpu
step mfu_pallas_gpu 150 $PY benchmarks/mfu.py --full --steps 5 --attn-impl pallas_gpu --loss-chunk 2048
step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py
tail -3 "$OUT/tests.log" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
