#!/usr/bin/env bash
# The GPU checks of issue 5 as one prepared command, sized for a 15-minute device lease.
#
#   bash benchmarks/gpu_lease.sh prepare   # here, before the lease: wheels the GPU image lacks
#   bash benchmarks/gpu_lease.sh run       # there, in one device `run` call with carry [".whl"]
#                                          #   and timeout_s 450 (its steps take at most 420 s)
#
# `run` writes everything under $OUT as it goes, so a run cut short still returns what it did:
#   versions.txt       nvidia-smi, Python packages, JAX devices
#   tests.log          tests/test_gpu.py and tests/test_golden.py on the GPU (float32 against
#                      upstream's golden vectors, cuDNN fused attention in bfloat16)
#   gpu-bfloat16-batch16.{json,md}, batch.log
#                      python -m benchmarks.run on a batch of 16 mixed clips (1-12 s): JAX bf16
#                      against the PyTorch oracle in float32 on the same GPU; the GPU goals
#   gpu-bfloat16-clips.{json,md}, clips.log
#                      the same for single 1 s and 10 s clips
# Commit the results files under benchmarks/results/ and report the goals they state.
set -uo pipefail
cd "$(dirname "$0")/.."

# Imported by losatok_jax.audio_io and missing from the device image (its package list:
# .library/device/KINDS.md); everything else the checks import is there.
WHEELS="librosa==0.11.0 soundfile==0.14.0 soxr==1.1.0 audioread==3.1.0 pooch==1.9.0
decorator==5.2.1 platformdirs==4.14.9 cffi==2.0.0 pycparser==3.0"

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
    ls .whl
}

run() {
    local out=${OUT:?set OUT to the folder that comes back}
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    # The JAX and PyTorch benchmark processes share the GPU: no up-front 75% for JAX.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    {
        nvidia-smi
        python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|orbax|optax|torch|numpy|librosa|nvidia-cudnn)'
        python3 -c 'import jax; print(jax.__version__, jax.devices())'
    } > "$out/versions.txt" 2>&1
    timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_golden.py \
        > "$out/tests.log" 2>&1
    echo "tests: exit $?" | tee -a "$out/tests.log"
    # The batched encode decides the GPU goals, so it runs first; rows print as they finish, so a
    # run cut short by its timeout leaves its rows in the log.
    timeout 200 python3 -m benchmarks.run --quick --durations "" --mixed-clips 16 --device gpu \
        --dtype bfloat16 --name gpu-bfloat16-batch16 --output-dir "$out" > "$out/batch.log" 2>&1
    echo "batch benchmark: exit $?" | tee -a "$out/batch.log"
    pkill -f 'python3 -m benchmarks[.]run' || true  # a timeout ends the parent, not its worker processes
    timeout 100 python3 -m benchmarks.run --quick --mixed-clips 0 --device gpu --dtype bfloat16 \
        --name gpu-bfloat16-clips --output-dir "$out" > "$out/clips.log" 2>&1
    echo "clip benchmark: exit $?" | tee -a "$out/clips.log"
    pkill -f 'python3 -m benchmarks[.]run' || true
    tail -n 30 "$out/batch.log" "$out/clips.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_lease.sh prepare|run" >&2; exit 2 ;;
esac
