#!/usr/bin/env bash
# Does capturing the decode loop's body in CUDA graphs (XLA command buffers) remove the per-kernel
# launch overhead that bounds small-model decode and two-GPU tensor parallelism?
# Runs the E2B-shaped batch-1 decode (GPU 0) and the 31B tensor-parallel decode (both GPUs) with
# XLA's default flags and with command buffers for every thunk type; records under $OUT.
#
#   OUT=runs/probe bash experiments/xla_flags_probe.sh
set -u
OUT=${OUT:-runs/probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for variant in default cmdbuf; do
  flags=""
  [ "$variant" = cmdbuf ] && flags="$CMDBUF"
  XLA_FLAGS="$flags" CUDA_VISIBLE_DEVICES=0 timeout 100 python experiments/benchmark.py \
      --models=gemma4_e2b --batches=1 --contexts=1024 --parts=copy,decode --copy_mb=1024 \
      --plot=false --out="$OUT/probe_e2b_$variant.json" > "$OUT/probe_e2b_$variant.log" 2>&1
  XLA_FLAGS="$flags" timeout 110 python experiments/tp_decode.py --single=false \
      --out="$OUT/probe_tp_$variant.json" > "$OUT/probe_tp_$variant.log" 2>&1
done
grep -h "ms/step\|ms/token\|Error\|error" "$OUT"/*.log | cut -c1-200
