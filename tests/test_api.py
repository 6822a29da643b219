"""The public API's contract: shapes, accepted inputs, clear errors, sampling, JAX transforms.

Uses the converted golden tiny_chunk40 model; almost every test feeds the same two input shapes,
(1, N) and (B, N), so the suite compiles only a handful of programs.
"""

import collections
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losatok_jax
from helpers import GOLDEN_DIR, broadband_audio, lowered_layers
from losatok_jax import FEATURE_KEYS, _programs, encode
from losatok_jax.api import decode, reconstruct

BATCH, NUM_SAMPLES = 2, 8000
TOKENS = (1 + NUM_SAMPLES // 160) // 4  # 12
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def audio():
    return broadband_audio(BATCH, NUM_SAMPLES, seed=7)


@pytest.fixture(scope="module")
def features(model, audio):
    return encode(model, audio)


def test_encode_returns_the_nine_features(model, features):
    assert tuple(features) == FEATURE_KEYS
    embed_dim, latent_dim = model.config.embed_dim, model.config.decoder_dim
    for key, value in features.items():
        width = embed_dim if key in ("semantic_emb", "acoustic_emb", "unified_emb") else latent_dim
        assert value.shape == (BATCH, TOKENS, width), key
    np.testing.assert_array_equal(features["z"], features["mu"])


@pytest.mark.parametrize("layout", ["numpy (B, N)", "jax (B, N)", "numpy (B, 1, N)",
                                    "jax (B, 1, N)", "float64 (B, N)"])
def test_batched_layouts_agree(model, audio, features, layout):
    as_type = {"numpy": np.asarray, "jax": jnp.asarray,
               "float64": lambda x: np.asarray(x, np.float64)}[layout.split()[0]]
    batch = audio[:, None, :] if "1" in layout.split()[1] else audio
    z = encode(model, as_type(batch))["z"]
    np.testing.assert_array_equal(z, features["z"])


@pytest.mark.parametrize("as_type", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_single_clip_matches_its_row_of_the_batch(model, audio, features, as_type):
    z = encode(model, as_type(audio[0]))["z"]
    assert z.shape == (1, TOKENS, model.config.decoder_dim)
    np.testing.assert_allclose(z[0], features["z"][0], rtol=0, atol=1e-5)


def test_shortest_input_is_513_samples(model):
    with pytest.raises(ValueError, match="512 samples.*at least 513"):
        encode(model, np.zeros(512, np.float32))
    assert encode(model, broadband_audio(1, 513, seed=0))["z"].shape == (1, 1, 16)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_rejects_non_finite_audio(model, audio, bad_value):
    corrupted = audio.copy()
    corrupted[1, 100] = bad_value
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(model, corrupted)


@pytest.mark.parametrize("shape", [(1, 1, 1, NUM_SAMPLES), (BATCH, 2, NUM_SAMPLES)],
                         ids=["4-D", "stereo"])
def test_rejects_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"(B, 1, N); got {shape}")):
        encode(model, np.zeros(shape, np.float32))


def test_rejects_integer_pcm(model):
    with pytest.raises(ValueError, match="floating point.*int16"):
        encode(model, np.zeros(NUM_SAMPLES, np.int16))


def test_sampling_needs_a_key(model, audio):
    with pytest.raises(ValueError, match="PRNG key"):
        encode(model, audio, sample=True)


def test_sampling_draws_around_mu(model, audio, features):
    key = jax.random.key(0)
    first = encode(model, audio, sample=True, rng=key)
    again = encode(model, audio, sample=True, rng=key)
    other = encode(model, audio, sample=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(first["z"], again["z"])
    assert not np.array_equal(first["z"], other["z"])
    for name in ("mu", "logvar"):
        np.testing.assert_array_equal(first[name], features[name])
    assert np.all(np.asarray(first["z"]) != np.asarray(first["mu"]))
    # z = mu + eps · exp(logvar / 2) with eps standard normal.
    eps = np.asarray((first["z"] - first["mu"]) / jnp.exp(first["logvar"] / 2))
    assert abs(eps.mean()) < 0.15 and 0.85 < eps.std() < 1.15, (eps.mean(), eps.std())


def test_decode_gives_640_samples_per_token(model, features):
    audio_out = decode(model, features["z"])
    assert audio_out.shape == (BATCH, 640 * TOKENS)
    assert np.isfinite(np.asarray(audio_out)).all()


def test_reconstruct_is_encode_then_decode(model, audio, features):
    audio_out, reconstructed = reconstruct(model, audio)
    assert tuple(reconstructed) == FEATURE_KEYS
    for key in FEATURE_KEYS:
        np.testing.assert_array_equal(reconstructed[key], features[key])
    np.testing.assert_array_equal(audio_out, decode(model, features["z"]))


def test_config_only_model_warns_that_it_is_untrained():
    config_path = GOLDEN_DIR / "tiny_chunk40" / "config.yml"
    with pytest.warns(UserWarning, match="untrained"):
        model = losatok_jax.load_losatok(config_path=config_path)
    assert model.config == losatok_jax.load_config(config_path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(model.params))


def test_encode_and_decode_inside_jit(model, audio, features):
    @jax.jit
    def round_trip(m, x):
        z = encode(m, x)["z"]
        return z, decode(m, z)

    z, audio_out = round_trip(model, audio)
    np.testing.assert_allclose(z, features["z"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(audio_out, decode(model, features["z"]), rtol=0, atol=1e-6)


def test_encode_under_vmap_over_clips(model, audio, features):
    z = jax.jit(jax.vmap(lambda clip: encode(model, clip)["z"][0]))(audio)
    np.testing.assert_allclose(z, features["z"], rtol=0, atol=1e-5)


def test_gradients_through_encode_and_decode(model, audio, features):
    audio_grad = jax.jit(jax.grad(lambda x: encode(model, x)["z"].sum()))(audio[0])
    assert audio_grad.shape == (NUM_SAMPLES,)
    assert np.isfinite(np.asarray(audio_grad)).all() and np.abs(audio_grad).max() > 0
    z_grad = jax.jit(jax.grad(lambda z: (decode(model, z) ** 2).sum()))(features["z"])
    assert np.isfinite(np.asarray(z_grad)).all() and np.abs(z_grad).max() > 0


def _compiled_programs() -> int:
    """Programs compiled so far by all of the API's jitted entry points."""
    jitted = [f for f in vars(_programs).values() if hasattr(f, "_cache_size")]
    assert jitted, "losatok_jax._programs has no jitted entry points to count"
    return sum(f._cache_size() for f in jitted)


def test_new_parameters_reuse_the_compiled_programs(model, audio, features):
    """Parameters are arguments, not constants: other values of the same shapes hit the cache."""
    other = losatok_jax.Losatok(jax.tree.map(lambda p: p * 1.1, model.params), model.config)
    decode(model, features["z"])  # compile decode for this shape with the first model
    compiled = _compiled_programs()
    other_z = encode(other, audio)["z"]
    other_audio = decode(other, other_z)
    assert _compiled_programs() == compiled
    assert np.abs(np.asarray(other_z - features["z"])).max() > 1e-3
    assert np.abs(np.asarray(other_audio - decode(model, other_z))).max() > 1e-4


def _parameter_constants(lowered, model) -> set[tuple[int, ...]]:
    """Shapes of the model's larger parameters that appear as constants in a lowered program."""
    constants = set(re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([^>]*)>",
                               lowered.as_text()))
    return {leaf.shape for leaf in jax.tree.leaves(model.params)
            if leaf.size >= 4096 and "x".join(map(str, leaf.shape)) + "xf32" in constants}


def test_lowered_program_takes_parameters_as_arguments(model, audio):
    as_argument = jax.jit(lambda m, x: encode(m, x)["z"]).lower(model, audio)
    assert len(jax.tree.leaves(as_argument.args_info)) == len(jax.tree.leaves(model.params)) + 1
    assert not _parameter_constants(as_argument, model)
    # Guards the check above: closing over the model does bake its parameters in, and shows.
    closed_over = jax.jit(lambda x: encode(model, x)["z"]).lower(audio)
    assert _parameter_constants(closed_over, model)


def _matmul_precisions(lowered) -> list[tuple[str, ...]]:
    """The operand precisions of every dot product and convolution in a lowered program."""
    ops = [line for line in lowered.as_text().splitlines()
           if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    return [tuple(re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", line)) for line in ops]


def _lowered_round_trip(model, audio):
    return jax.jit(lambda m, x: decode(m, encode(m, x)["z"])).lower(model, audio)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmuls_run_at_full_float32_precision_on_every_backend(model, audio, dtype):
    """JAX's default precision lets GPUs use TF32 and TPUs one bfloat16 pass for float32
    matmuls; the model's programs ask for full precision (bfloat16 operands stay bfloat16)."""
    model = model.astype(dtype)
    for lowered in [_lowered_round_trip(model, audio), *lowered_layers(model)]:
        precisions = _matmul_precisions(lowered)
        assert len(precisions) >= 2
        assert set(precisions) == {("HIGHEST", "HIGHEST")}


@pytest.mark.parametrize("precision, level", [("tensorfloat32", "HIGH"), ("default", "DEFAULT")])
def test_a_matmul_precision_the_caller_sets_is_kept(model, audio, precision, level):
    """A precision the caller sets reaches every model matmul but the mel front ends', which
    always compute at full precision."""
    with jax.default_matmul_precision(precision):
        round_trip = collections.Counter(_matmul_precisions(_lowered_round_trip(model, audio)))
        layers = [set(_matmul_precisions(lowered)) for lowered in lowered_layers(model)]
        caller_z = encode(model, audio)["z"]
    assert layers == [{(level, level)}] * 2
    assert set(round_trip) == {(level, level), ("HIGHEST", "HIGHEST")}
    assert round_trip[(level, level)] > round_trip[("HIGHEST", "HIGHEST")]
    # On CPU the precision changes nothing: the same bits either way.
    np.testing.assert_array_equal(caller_z, encode(model, audio)["z"])


def test_runtime_package_never_imports_torch():
    code = ("import sys, losatok_jax, losatok_jax.api, losatok_jax.checkpoint, losatok_jax.convert; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                                            "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr


def test_progress_reports_every_batch_of_both_stages(model):
    clips = [np.zeros(16000 * seconds, np.float32) + 0.01 for seconds in (1, 2, 30)]
    calls = []
    audio, _ = reconstruct(model, clips, features=("z",),
                           progress=lambda *call: calls.append(call))
    assert len(audio) == 3
    for stage in ("encoding", "decoding"):
        done = [(d, total) for s, d, total in calls if s == stage]
        total = done[0][1]
        assert done == [(i, total) for i in range(1, total + 1)], stage
    stages = [s for s, _, _ in calls]
    assert stages == sorted(stages, key=lambda s: s == "decoding")  # encoding, then decoding


def test_bad_arguments_raise_the_packages_error(model):
    """Every error a bad argument causes is a `LosatokError` (a `ValueError` too)."""
    for call in (lambda: encode(model, np.zeros(100, np.float32)),
                 lambda: decode(model, np.zeros((1, 4, 3), np.float32)),
                 lambda: losatok_jax.Buckets(batch_sizes=(4, 2)),
                 lambda: losatok_jax.load_losatok(dtype="int8")):
        with pytest.raises(losatok_jax.LosatokError):
            call()
