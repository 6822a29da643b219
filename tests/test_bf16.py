"""bfloat16 compute: which parameters it casts, that outputs stay float32 and close to float32, and
that the float32 model is untouched by the dtype plumbing.

Uses the golden tiny_chunk40 model. Its accuracy numbers are not the full-size ones (two blocks,
64 wide, accumulate less rounding than 32 blocks, 1280 wide): those are measured by
`python -m benchmarks.run --accuracy` and reported in the README.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losatok_jax
from signals import log_spectral_distance, music_signal, noise_signal, speech_signal, token_cosines
from losatok_jax.api import reconstruct


@pytest.fixture(scope="module")
def model16(model):
    return model.astype("bfloat16")


@pytest.fixture(scope="module")
def signals():
    return {"speech": speech_signal(), "music": music_signal(3.0), "noise": noise_signal(2.0)}


def test_float32_program_has_no_bfloat16(model, model16):
    z = jax.ShapeDtypeStruct((1, 32, model.config.decoder_dim), jnp.float32)
    n = jax.ShapeDtypeStruct((1,), jnp.int32)
    decode = jax.jit(lambda m, z, n: m.apply(z, n, method="decode"))
    assert "bf16" not in decode.lower(model, z, n).as_text()
    assert "bf16" in decode.lower(model16, z, n).as_text()


def test_float32_default_is_unchanged(model, signals):
    """An explicit float32 model computes exactly what the default one does."""
    explicit = losatok_jax.Losatok(model.params, model.config, dtype="float32")
    audio = signals["noise"][None]
    a, b = losatok_jax.encode(model, audio), losatok_jax.encode(explicit, audio)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_bfloat16_outputs_are_float32_and_close(model, model16, signals):
    for name, audio in signals.items():
        f32 = losatok_jax.encode(model, audio[None])
        f16 = losatok_jax.encode(model16, audio[None])
        for key in f32:
            assert f16[key].dtype == np.float32, key
            assert np.isfinite(f16[key]).all(), key
        cos = token_cosines(f32["z"], f16["z"])
        assert cos.min() >= 0.999, (name, cos.min())
        rel = np.linalg.norm(f16["z"] - f32["z"]) / np.linalg.norm(f32["z"])
        assert rel < 0.02, (name, rel)
        audio32 = losatok_jax.api.decode(model, f32["z"])[0]
        audio16 = losatok_jax.api.decode(model16, f16["z"])[0]
        assert audio16.dtype == np.float32
        assert log_spectral_distance(audio32, audio16) < 1.0, name


def test_load_losatok_bfloat16(golden_checkpoint, signals):
    model16 = losatok_jax.load_losatok(golden_checkpoint("tiny_chunk40"), dtype="bfloat16")
    assert model16.dtype == "bfloat16"
    qkv = model16.params["semantic_encoder"]["encoder"]["blocks"]["attn"]["qkv"]
    assert qkv["weight"].dtype == jnp.bfloat16 and qkv["bias"].dtype == jnp.float32
    recon, features = reconstruct(model16, signals["speech"][None], features=("z",))
    assert recon.dtype == np.float32 and np.isfinite(recon).all()


def test_bfloat16_under_a_callers_jit(model16, signals):
    audio = jnp.asarray(signals["noise"][None, :16000])
    z = jax.jit(lambda m, x: losatok_jax.encode(m, x, features=("z",))["z"])(model16, audio)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, losatok_jax.encode(model16, np.asarray(audio))["z"],
                               rtol=0, atol=1e-2)


def test_fused_attention_key_lengths_equal_the_mask():
    """The cuDNN path (GPU, bfloat16) passes each chunk's prefix mask as key lengths; on any
    backend those give the masked attention. On CPU `attention` is XLA's with the mask, always."""
    from losatok_jax._layers import attention, key_lengths

    q, k, v = jax.random.normal(jax.random.key(0), (3, 3, 8, 2, 4))
    mask = jnp.arange(8)[None, :] < jnp.array([8, 5, 1])[:, None]
    masked = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=0.5)
    by_length = jax.nn.dot_product_attention(q, k, v, scale=0.5, implementation="xla",
                                             key_value_seq_lengths=key_lengths(mask))
    np.testing.assert_allclose(by_length, masked, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(key_lengths(jnp.zeros((1, 8), bool)), [1])
    if jax.default_backend() == "cpu":
        np.testing.assert_allclose(attention(q, k, v, mask, 0.5, fused=True), masked,
                                   rtol=1e-6, atol=1e-6)


def test_refused_cudnn_attention_falls_back_with_a_warning(monkeypatch):
    """Where the backend is a GPU but cuDNN refuses (here: a CPU posing as one, which has no
    cuDNN), attention is the XLA computation, and the user is told."""
    from losatok_jax._layers import attention, heads_major_attention

    q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 8, 2, 16)).astype(jnp.bfloat16)
    mask = jnp.arange(8)[None, :] < jnp.array([8, 3])[:, None]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(RuntimeWarning, match="cuDNN fused attention unavailable"):
        out = attention(q, k, v, mask, 0.25, fused=True)
    np.testing.assert_array_equal(out, heads_major_attention(q, k, v, mask, 0.25))
