#!/usr/bin/env bash
# Everything a borrowed GPU machine should check, as ONE command that fits a short lease:
#   1. the GPU tests: tests/test_gpu.py (the cuDNN kernel) and the engine / kv-attention /
#      attention modules run on the GPU (JAX_PLATFORMS=cuda; the tests that need 8 devices
#      are left out), so the engine's exactness claims (same tokens for every K, block by
#      block = whole cache) are checked against the GPU's own kernels;
#   2. gpu_check.sh: one ESPO train step of the Qwen3-0.6B shape (step time, MFU);
#   3. decode_read.py: the engine's decode attention over a 16k cache (1.7B heads, K=64),
#      block by block against whole reads (tunes rollout.decode_read for the GPU);
#   4. sampler.py --ragged: continuous batching against static batches on the GPU.
# Each part has its own time limit (9 minutes in all at most), so one slow part cannot
# eat the lease; a part that fails is reported and the next one runs. Logs (one per part)
# and gpu_check's JSON go to OUT (default experiments/benchmarks/results/device-<host>).
#
# The GPU image has jax (CUDA), optax, orbax-checkpoint, transformers, torch and pytest,
# but not ml-collections, math-verify or tensorboardX, and its flax may not be ours: fetch
# those wheels here once, at this venv's versions, into .whl/ (git-ignored), and carry it:
#
#   bash experiments/benchmarks/device_check.sh --wheels          # here, with pip
#   bash experiments/benchmarks/device_check.sh "$OUT"            # there (device run,
#                                                                 # carry [".whl"])
# PYTHON picks the interpreter (default: .venv/bin/python for --wheels, else python3, the
# GPU image's). DEVICE_CHECK_QUICK=1 runs the same parts at tiny sizes on whatever JAX has
# (tests/test_benchmarks.py runs it on CPU, so the script cannot rot between leases).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="ml-collections math-verify latex2sympy2_extended antlr4-python3-runtime tensorboardX flax"

if [[ "${1:-}" == "--wheels" ]]; then
  set -e
  PY="${PYTHON:-.venv/bin/python}"
  # name==version as installed here (the versions the tests passed with), else unpinned
  mapfile -t pins < <("$PY" -c "import importlib.metadata as m
for n in '$WHEELS'.split():
    try: print(f'{n}=={m.version(n)}')
    except m.PackageNotFoundError: print(n)")
  rm -rf .whl && mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
  ls .whl
  exit 0
fi

OUT="${1:-experiments/benchmarks/results/device-$(hostname -s 2>/dev/null || echo host)}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/device-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/device-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
QUICK="${DEVICE_CHECK_QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
  tests=(tests/test_gpu.py) workers=0
  gpu_args=(--tiny) read_args=(--tiny) sampler_args=(--ragged --quick)
else
  export JAX_PLATFORMS=cuda  # tests/conftest.py defaults to cpu
  tests=(tests/test_gpu.py tests/test_kv_attention.py tests/test_engine.py
         tests/test_attention.py -k "not sharded and not mesh") workers=4
  gpu_args=() read_args=(--model=1.7b --slots=64 --cache=16896)
  sampler_args=(--ragged --seeds 2)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())
assert $QUICK or jax.default_backend() == 'gpu', 'JAX sees no GPU'" || exit 1

failed=()
part() {  # part NAME SECONDS CMD...: run CMD under a limit, log to OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc == 0 ]] || failed+=("$name($rc)")
}

# Test modules in parallel, GPU memory taken on demand (no process preallocates 75%).
part tests 200 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -q \
  -p no:cacheprovider -n "$workers" --dist loadfile "${tests[@]}"
part gpu_check 150 env PYTHON="$PY" bash experiments/benchmarks/gpu_check.sh \
  --json "$OUT/gpu_check.json" "${gpu_args[@]}"
part decode_read 90 "$PY" experiments/benchmarks/decode_read.py "${read_args[@]}"
part sampler_ragged 90 "$PY" experiments/benchmarks/sampler.py "${sampler_args[@]}"

if ((${#failed[@]})); then
  echo "device_check: FAILED ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "device_check: all parts passed (logs in $OUT)"
