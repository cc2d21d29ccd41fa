#!/bin/bash
# The GPU rows of benchmarks/RESULTS.md in one call of a lent machine (15 minutes of device time a
# session: the machine's start takes 1-2 of them). Prepare here, once:
#     python benchmarks/pack_minilm.py --out .dev/minilm --check
# then run there, carrying .dev:  bash benchmarks/gpu.sh $OUT
# Each part has its own timeout so that one slow compilation cannot eat the others' time.
# Stop 16 saw float32 compilations of the engine take > 150 s on an H200 (float64: 68 s for 2
# layers), probably XLA's GEMM/fusion autotuning: the flags below turn it off (check the times).
set -u
OUT=${1:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
PY=${PY:-python3}
BASE_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
export XLA_FLAGS="$BASE_FLAGS --xla_gpu_experimental_enable_fusion_autotuner=false"
# XLA aborts on a flag it does not know: keep the experimental one only where it exists.
$PY -c "import jax.numpy as j; j.ones(2).block_until_ready()" 2>/dev/null || export XLA_FLAGS="$BASE_FLAGS"
echo "XLA_FLAGS=$XLA_FLAGS"
gunzip -kf .dev/minilm/model.safetensors.gz || exit 1
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$OUT/env.txt"
part() {  # part NAME TIMEOUT COMMAND...: run, keep the log under $OUT, print its table
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T), timeout $limit s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || echo "   exit $? (124: timed out)"
    grep -v "certificates, " "$OUT/$name.log" | tail -12
}
part throughput 200 $PY benchmarks/throughput.py --model .dev/minilm --layers 1 --method crown-zonotope \
    --eps 1e-5 --prompts 256 --batch 8 --check 1 --out "$OUT/throughput.json"
part minilm6 300 $PY benchmarks/bound_tightness.py --model minilm --model-dir .dev/minilm --eps 1e-6 1e-5 \
    --methods crown-zonotope --precision float64 --out "$OUT/minilm6.json"
echo "== done $(date +%T)"
