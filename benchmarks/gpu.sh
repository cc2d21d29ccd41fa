#!/bin/bash
# The GPU rows of benchmarks/RESULTS.md in one call of a lent machine (15 minutes of device time a
# session: the machine's start takes 1-2 of them). Prepare here, once:
#     python benchmarks/pack_minilm.py --out .dev/minilm --check
# then run there, carrying .dev and benchmarks/out/digits-denoiser:  bash benchmarks/gpu.sh $OUT
# The parts run side by side (XLA's compilations are CPU work, 16 cores there; the GPU's memory is not
# preallocated so the processes share it), each under its own timeout.
# Stop 16 saw float32 compilations of the engine take > 150 s on an H200 (float64: 68 s for 2
# layers), probably XLA's GEMM/fusion autotuning: the flags below turn it off (check the times).
set -u
OUT=${1:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
BASE_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
export XLA_FLAGS="$BASE_FLAGS --xla_gpu_experimental_enable_fusion_autotuner=false"
# XLA aborts on a flag it does not know: keep the experimental one only where it exists.
$PY -c "import jax.numpy as j; j.ones(2).block_until_ready()" 2>/dev/null || export XLA_FLAGS="$BASE_FLAGS"
echo "XLA_FLAGS=$XLA_FLAGS"
gunzip -kf .dev/minilm/model.safetensors.gz || exit 1
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$OUT/env.txt"
PARTS=${PARTS:-soundness throughput minilm6 unet10}  # PARTS="throughput unet10" bash benchmarks/gpu.sh $OUT
part() {  # part NAME TIMEOUT COMMAND...: run in the background, log under $OUT
    local name=$1 limit=$2; shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "== $name started $(date +%T), timeout $limit s"
    ( timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? (124: timed out) at $(date +%T)" >> "$OUT/$name.log" ) &
}
part throughput 480 $PY benchmarks/throughput.py --model .dev/minilm --layers 1 --method crown-zonotope \
    --eps 1e-5 --prompts 256 --batch 8 --check 1 --out "$OUT/throughput.json"
# minilm6 keeps its compiled program in a persistent cache (not yet tried on a GPU): copy the returned
# $OUT/xla-cache to .dev/xla-cache and run with XLA_CACHE=.dev/xla-cache; that call should load it, not compile.
part minilm6 480 env JAX_COMPILATION_CACHE_DIR="${XLA_CACHE:-$OUT/xla-cache}" $PY benchmarks/bound_tightness.py \
    --model minilm --model-dir .dev/minilm --eps 1e-6 1e-5 1e-4 --methods crown-zonotope --precision float64 \
    --out "$OUT/minilm6.json"
part unet10 420 $PY benchmarks/lipschitz.py --denoiser benchmarks/out/digits-denoiser --steps 10 --methods local \
    --engine-methods zonotope --radii 1e-5 --precision float64 --eager --out "$OUT/unet10.json"
part soundness 300 $PY -m pytest -q -p no:cacheprovider tests/bounds/test_relaxations.py tests/bounds/test_graph.py
wait
for name in $PARTS; do
    [[ -f "$OUT/$name.log" ]] || continue
    echo "== $name"; grep "certificates, " "$OUT/$name.log" | tail -1; grep -v "certificates, " "$OUT/$name.log" | tail -14
done
echo "== done $(date +%T)"
