"""Position-wise row blocks (`_layers.in_row_blocks`), the CPU layer path's long-row matmuls,
heads-major attention (`_layers.heads_major_attention`) and the exact GELU (`_layers.gelu`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losatok_jax
from losatok_jax.api import decode
from losatok_jax._layers import (ConvNeXtBlock, TransformerBlock, gelu, heads_major_attention,
                                 in_row_blocks)
from losatok_jax.runners import CPU_MATMUL_ROWS


def test_row_blocks_are_near_equal_and_at_most_max_rows():
    weights = jax.random.normal(jax.random.key(0), (6, 5))
    x = jax.random.normal(jax.random.key(1), (2, 1250, 6))
    seen = []

    def position_wise(rows):
        seen.append(rows.shape)
        return jnp.tanh(rows @ weights)

    out = in_row_blocks(position_wise, x, 1024)
    assert seen == [(834, 6), (834, 6), (832, 6)]  # 2500 rows in three blocks
    np.testing.assert_allclose(out, jnp.tanh(x @ weights), rtol=1e-6, atol=1e-6)
    assert out.shape == (2, 1250, 5)


@pytest.mark.parametrize("max_rows", [None, 2500])
def test_rows_within_max_rows_run_in_one_call(max_rows):
    seen = []
    in_row_blocks(lambda rows: seen.append(rows.shape) or rows, jnp.zeros((2, 1250, 6)), max_rows)
    assert seen == [(2, 1250, 6)]


@pytest.mark.parametrize("block, args", [
    (TransformerBlock(num_heads=2, mlp_dim=32, qkv_bias=True, init_values=None),
     (jnp.ones((3, 20), bool),)),
    (ConvNeXtBlock(intermediate_dim=32, layer_scale_init=0.5), (jnp.ones((3, 20, 1)),)),
])
def test_blocks_with_row_blocks_equal_the_whole_rows(block, args):
    x = jax.random.normal(jax.random.key(2), (3, 20, 8))
    params = block.init(jax.random.key(3), x, *args)
    whole = block.apply(params, x, *args)[0]
    in_blocks = block.clone(max_rows=16)
    assert jax.tree.structure(in_blocks.init(jax.random.key(3), x, *args)) == \
        jax.tree.structure(params)
    np.testing.assert_allclose(in_blocks.apply(params, x, *args)[0], whole, rtol=1e-6, atol=1e-6)


def qkv_and_mask(batch=3, length=8, heads=2, head_dim=4):
    """Random (B, L, H, head_dim) q, k, v and prefix masks of 8, 5 and 0 real tokens (a chunk
    of pure padding, as a batch's filler row has)."""
    q, k, v = jax.random.normal(jax.random.key(0), (3, batch, length, heads, head_dim))
    return q, k, v, jnp.arange(length)[None, :] < jnp.array([8, 5, 0])[:, None]


def test_heads_major_attention_is_jax_attention():
    """`jax.nn.dot_product_attention`'s XLA path in float32 up to rounding, a fully padded chunk
    included (finite: it attends evenly); bfloat16 keeps its output dtype and agrees. The float32
    results are bit-identical on one CPU here and differ by up to 1.2e-7 on another (EPYC family
    23), where XLA's kernels sum in another order."""
    q, k, v, mask = qkv_and_mask()
    reference = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], scale=0.5)
    np.testing.assert_allclose(heads_major_attention(q, k, v, mask, 0.5), reference,
                               rtol=1e-6, atol=1e-6)
    assert np.isfinite(reference[2]).all()
    low = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    out = heads_major_attention(*low, mask, 0.5)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), jax.nn.dot_product_attention(
        *low, mask=mask[:, None, None, :], scale=0.5).astype(jnp.float32), rtol=0, atol=2e-2)


def test_cpu_decoder_layers_split_long_rows_and_match_the_scan(model):
    """A 640-token window decodes through 1280-frame rows, past CPU_MATMUL_ROWS."""
    assert 2 * 640 > CPU_MATMUL_ROWS
    z = np.random.default_rng(4).standard_normal((640, model.config.decoder_dim), np.float32)
    scanned = losatok_jax.Runner(model)
    scanned.layers = None
    np.testing.assert_allclose(decode(model, [z])[0], decode(model, [z], runner=scanned)[0],
                               rtol=1e-6, atol=1e-7)


def test_gelu_is_the_exact_erf_form():
    """Within 1e-6 of x·Φ(x) in float64 over [-12, 12], the negative tail included (where the erf
    form's 1 + erf cancels); bfloat16 in, bfloat16 out, within bfloat16 rounding."""
    def exact(values):
        return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in values.astype(np.float64)])

    x = np.linspace(-12, 12, 48001, dtype=np.float32)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), exact(x), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(gelu(jnp.asarray(x[x > 6]))) == x[x > 6])  # Φ(x) rounds to 1
    low = gelu(jnp.asarray(x, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    rounded = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(low, np.float32), exact(rounded), rtol=2**-8, atol=1e-6)
