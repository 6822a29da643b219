"""Full-precision float32 products as a TPU computes them here (six bfloat16 passes), run on
CPU: as precise as a float32 product, with a float32 product's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losatok_jax import _products, spectral
from losatok_jax.model import full_float32_matmuls


def _spread(rng, shape):
    """Values over many binades, as spectra and activations have."""
    return (rng.standard_normal(shape) * np.exp(rng.normal(0.0, 3.0, shape))).astype(np.float32)


@pytest.mark.parametrize("matrix", ["dft", "mel", "inverse_dft"])
def test_six_bfloat16_passes_multiply_as_precisely_as_float32(matrix):
    """Errors relative to the sum of the terms' magnitudes, which bounds a float32 product's
    rounding."""
    m = {"dft": spectral.windowed_dft(1024),
         "mel": spectral.mel_filterbank(1024, 128, 16000, 0.0, 8000.0),
         "inverse_dft": spectral.windowed_inverse_dft(1280)}[matrix]
    x = _spread(np.random.default_rng(7), (2, 50, m.shape[0]))
    exact = x.astype(np.float64) @ m.astype(np.float64)
    scale = np.maximum(np.abs(x).astype(np.float64) @ np.abs(m).astype(np.float64), 1e-30)

    def error(product):
        return np.max(np.abs(np.asarray(product, np.float64) - exact) / scale)

    def bfloat16(a):
        return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)

    passes = error(jax.jit(lambda x: _products.product_in_bfloat16_passes(x, m))(x))
    float32 = error(x @ m)
    assert passes <= 4 * float32 and passes < 1e-5, (passes, float32)
    one_pass = error(bfloat16(x) @ bfloat16(m))
    assert one_pass > 1000 * passes, (one_pass, passes)  # a single bfloat16 pass would not do


def test_products_in_passes_have_the_float32_products_value_and_gradients():
    """The TPU's branch of a linear layer, called directly: its value is the float32 product's to
    rounding, and so are its gradients (computed at full precision, not in bfloat16 pieces)."""
    rng = np.random.default_rng(3)
    x, weight = _spread(rng, (3, 40, 96)), rng.standard_normal((24, 96)).astype(np.float32)
    cotangent = _spread(rng, (3, 40, 24))

    def both(product):
        value, pullback = jax.vjp(product, x, weight)
        return value, pullback(cotangent)

    with full_float32_matmuls():
        found = both(_products._linear_in_passes)
        expected = both(_products._linear)
    scales = (np.abs(x) @ np.abs(weight).T, np.abs(cotangent) @ np.abs(weight),
              np.einsum("blo,bli->oi", np.abs(cotangent), np.abs(x)))
    for value, reference, scale in zip(jax.tree.leaves(found), jax.tree.leaves(expected), scales):
        assert np.max(np.abs(value - reference) / scale) < 1e-6
    # Differentiating the pieces instead would round the cotangents to bfloat16.
    pieces = jax.vjp(lambda x, w: _products.product_in_bfloat16_passes.fun(x, w.T), x, weight)
    dx = pieces[1](cotangent)[0]
    assert np.max(np.abs(dx - expected[1][0]) / scales[1]) > 1e-4
    # The model's layers take this product wherever they compute in float32 (the CPU's branch).
    with full_float32_matmuls():
        np.testing.assert_array_equal(jax.jit(_products.linear)(x, weight), expected[0])
