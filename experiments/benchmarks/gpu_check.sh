#!/usr/bin/env bash
# Times one ESPO train step of a random Qwen3-0.6B-shaped model (bf16 compute, f32 master
# weights, AdamW) on the GPUs of this machine and reports MFU. For whoever has a GPU:
#
#   pip install -U "jax[cuda12]"            # once, in the project's venv (CPU jax otherwise)
#   bash experiments/benchmarks/gpu_check.sh                       # all local GPUs, FSDP
#   bash experiments/benchmarks/gpu_check.sh --model=1.7b --batch=16
#   bash experiments/benchmarks/gpu_check.sh --tiny                # CPU syntax check
#
# Extra flags go to gpu_check.py (--batch, --prompt-len, --response-len, --data/--fsdp/
# --tensor, --remat, --peak-tflops, --json=out.json). Result: experiments/benchmarks/
# results/gpu_check-<host>.json unless --json is given.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# GPU XLA flags that help a training step: overlap collectives with compute, and let
# XLA use most of the GPU memory up front (no fragmentation from on-demand growth).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [[ " $* " == *" --tiny "* ]]; then
  export XLA_FLAGS=""   # GPU-only flags are rejected by the CPU backend
fi

OUT=()
if [[ " $* " != *"--json"* ]]; then
  mkdir -p experiments/benchmarks/results
  OUT=(--json "experiments/benchmarks/results/gpu_check-$(hostname -s 2>/dev/null || echo host).json")
fi
exec "$PY" experiments/benchmarks/gpu_check.py "${OUT[@]}" "$@"
