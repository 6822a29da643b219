#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU and this checkout installed
# with the test extra (`pip install -e ".[gpu,test]"`):
#
#   bash benchmarks/gpu_checks.sh [OUT]     # OUT: where the logs and results go (gpu-checks/)
#
# It writes everything under OUT as it goes, so a run cut short still leaves what it did:
#   versions.txt       nvidia-smi, Python packages, JAX devices
#   tests.log          tests/test_gpu.py on the GPU (float32 against upstream's golden vectors,
#                      cuDNN fused attention in bfloat16)
#   gpu-bfloat16-batch16.{json,md}, batch.log
#                      python -m benchmarks.run on a batch of 16 mixed clips (1-12 s): JAX bf16
#                      against the PyTorch oracle in float32 on the same GPU; the GPU goals
# Each step has a time limit; together they take at most about 10 minutes. XLA's GPU compile is
# most of it (18-35 s per encode program on an H200), so the single-clip rows run apart:
#   python3 -m benchmarks.run --quick --mixed-clips 0 --device gpu --dtype bfloat16
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The JAX and PyTorch benchmark processes share the GPU: no up-front 75% for JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
    nvidia-smi
    python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|orbax|optax|torch|numpy|librosa|nvidia-cudnn)'
    python3 -c 'import jax; print(jax.__version__, jax.devices())'
} > "$out/versions.txt" 2>&1
timeout 180 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py \
    > "$out/tests.log" 2>&1
echo "tests: exit $?" | tee -a "$out/tests.log"
# The batched encode decides the GPU goals. Rows print as they finish, so a run cut short by its
# timeout leaves its rows in the log.
timeout 390 python3 -m benchmarks.run --quick --durations "" --mixed-clips 16 --device gpu \
    --dtype bfloat16 --name gpu-bfloat16-batch16 --output-dir "$out" > "$out/batch.log" 2>&1
echo "batch benchmark: exit $?" | tee -a "$out/batch.log"
pkill -f 'python3 -m benchmarks[.]run' || true  # a timeout ends the parent, not its workers
tail -n 30 "$out/tests.log" "$out/batch.log"
