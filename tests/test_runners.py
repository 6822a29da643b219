"""Runners: the CPU runner's per-layer path on views of the stacked weights, and the mesh and pmap
runners, each against the others."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import broadband_audio, lowered_layers

import losatok_jax
from losatok_jax import FEATURE_KEYS, encode
from losatok_jax.api import decode

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def audio():
    return broadband_audio(2, 8000, seed=7)


def _eight_cpu_devices() -> dict:
    """A child environment that imports this checkout and sees 8 CPU devices."""
    inherited = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**inherited, "PYTHONPATH": str(REPO_ROOT),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_layer_programs_read_linear_weights_as_stored(model):
    """Every weight product contracts the (out, in) weight's last axis, the layout XLA's CPU dots
    read fastest (docs/performance.md, "Weight layout"), with no transposed copy of a weight."""
    for lowered in lowered_layers(model):
        compiled = lowered.compile().as_text()
        products = [line for line in compiled.splitlines()
                    if " dot(" in line and "lhs_batch_dims" not in line]
        assert len(products) >= 2
        assert all("rhs_contracting_dims={1}" in line for line in products)
        assert not re.search(r"(transpose|copy)\([^)]*weight", compiled)


def test_cpu_runner_runs_layers_on_views_of_the_stacked_weights(model):
    """The CPU Runner's per-layer weights are the stacked arrays' memory, not copies."""
    layers = losatok_jax.Runner(model).layers
    stacked = model.params["semantic_encoder"]["encoder"]["blocks"]["mlp"]["fc1"]["weight"]
    per_layer = [weights["mlp"]["fc1"]["weight"] for weights in layers["semantic"]]
    assert len(per_layer) == model.config.semantic.depth
    for i, weight in enumerate(per_layer):
        np.testing.assert_array_equal(weight, stacked[i])
        offset = weight.unsafe_buffer_pointer() - stacked.unsafe_buffer_pointer()
        assert offset == i * weight.nbytes
    assert losatok_jax.Runner(model).layers is layers  # built once per model


def test_per_layer_runs_equal_the_scanned_stacks(model, audio):
    """One jitted call per layer (the CPU Runner) against one scan per stack (pmap, meshes and
    traces), on the same inputs and parameters."""
    per_layer = losatok_jax.Runner(model)
    scanned = losatok_jax.Runner(model)
    scanned.layers = None
    clips = [audio[0], audio[1, :5000]]
    a = encode(model, clips, runner=per_layer)
    b = encode(model, clips, runner=scanned)
    for fa, fb in zip(a, b):
        for key in FEATURE_KEYS:
            np.testing.assert_allclose(fa[key], fb[key], rtol=1e-6, atol=1e-6, err_msg=key)
    audio_a = decode(model, [f["z"] for f in a], runner=per_layer)
    audio_b = decode(model, [f["z"] for f in a], runner=scanned)
    for x, y in zip(audio_a, audio_b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_per_layer_weights_follow_parameters_replaced_in_place(model, audio):
    other = losatok_jax.Losatok(jax.tree.map(lambda p: p, model.params), model.config)
    before = encode(other, audio)["z"]
    blocks = other.params["semantic_encoder"]["encoder"]["blocks"]
    blocks["mlp"]["fc2"]["weight"] = blocks["mlp"]["fc2"]["weight"] * 1.5
    after = encode(other, audio)["z"]
    scanned = losatok_jax.Runner(other)
    scanned.layers = None
    np.testing.assert_allclose(after, encode(other, audio, runner=scanned)["z"], atol=1e-6)
    assert np.abs(after - before).max() > 1e-3


PARALLEL_SCRIPT = textwrap.dedent(r"""
    import logging, re, sys
    import numpy as np, jax
    import losatok_jax
    from losatok_jax._execution import lower_programs
    from losatok_jax.runners import MeshRunner, PmapRunner
    assert jax.local_device_count() == 8, jax.devices()
    model = losatok_jax.load_losatok(sys.argv[1])
    buckets = losatok_jax.Buckets(batch_sizes=(1, 2), num_tokens=(32, 64))
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(n))).astype(np.float32)
             for n in rng.uniform(600, 16000 * 6, 13)]
    key = jax.random.key(3)
    ref = losatok_jax.encode(model, clips, buckets=buckets, sample=True, rng=key)
    ref_audio = losatok_jax.api.decode(model, [f["z"] for f in ref], buckets=buckets)
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda record: compiled.append(record.getMessage()[:100])
    for runner in (PmapRunner(model), MeshRunner(model)):
        assert runner.num_devices == 8
        warm = losatok_jax.warmup(model, buckets, sample=True, runner=runner)
        logging.getLogger("jax").addHandler(handler)
        jax.config.update("jax_log_compiles", True)
        out = losatok_jax.encode(model, clips, buckets=buckets, sample=True, rng=key, runner=runner)
        audio = losatok_jax.api.decode(model, [f["z"] for f in out], buckets=buckets, runner=runner)
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(handler)
        programs = [m for m in compiled if "Compiling" in m]
        assert not programs, programs  # warmup compiled everything the runner runs
        feature_error = max(np.abs(a[k] - b[k]).max() for a, b in zip(ref, out) for k in a)
        audio_error = max(np.abs(a - b).max() for a, b in zip(ref_audio, audio))
        print(type(runner).__name__, warm, feature_error, audio_error)
        assert feature_error <= 1e-5 and audio_error <= 1e-5
    # A mesh runner on abstract parameters lowers the same programs, without collectives.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model)
    texts = [p.compile().as_text() for p in lower_programs(MeshRunner(abstract), buckets)]
    assert len(texts) == warm
    collectives = [c for t in texts for c in re.findall(
        r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", t)]
    assert not collectives, collectives
    print("abstract", len(texts))
""")


def test_parallel_equals_single_on_8_devices(checkpoint):
    result = subprocess.run([sys.executable, "-c", PARALLEL_SCRIPT, str(checkpoint)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env=_eight_cpu_devices())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PmapRunner" in result.stdout and "MeshRunner" in result.stdout
    assert "abstract" in result.stdout
