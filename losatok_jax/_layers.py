"""Building blocks shared by the LoSATok modules: norms, the transformer block, the ConvNeXt block.

Shape letters: B batch, L tokens in a chunk, F decoder frames, E/C widths, H heads.

Mixed precision: every block takes a compute `dtype` (None: float32, exactly the float32 program).
With bfloat16, matmuls and convolutions take bfloat16 operands; the residual streams stay float32
(a bfloat16 branch output is added to a float32 residual), LayerNorm statistics and GELU are
computed in float32, and attention logits and softmax are float32 (`jax.nn.dot_product_attention`
does that for bfloat16 inputs).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from losatok_jax._products import linear


def gelu(x):
    """Exact GELU as upstream's PyTorch computes it, x · 0.5 · (1 + erf(x / √2)), in float32 and
    cast back to x's dtype. jax.nn.gelu defaults to the tanh approximation, and its exact form goes
    through erfc, whose |x| ≥ 1 branch costs an exp (docs/performance.md, "Layer choices")."""
    y = x.astype(jnp.float32)
    return (y * 0.5 * (1.0 + jax.lax.erf(y * (1 / math.sqrt(2))))).astype(x.dtype)


# A compute dtype: None means float32, leaving every layer's dtype to Flax's inference from float32
# inputs and parameters, so the float32 program is the one built before dtypes existed.
Dtype = Any


def compute_dtype(dtype) -> Dtype:
    """None for float32 (or None), else the jnp dtype: what the layers' `dtype` fields take."""
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return None
    return jnp.dtype(dtype)


# Parameter names of the matrices: linear layers' weights and convolution kernels (what bfloat16
# storage casts and weight decay applies to; biases, norms and gains are neither).
MATRIX_PARAMS = ("weight", "kernel")


def layer_norm(epsilon: float, name: str | None = None, dtype: Dtype = None) -> nn.LayerNorm:
    """LayerNorm with two-pass variance, as PyTorch computes it; statistics always in float32
    (Flax promotes them), output in `dtype`."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


class Linear(nn.Module):
    """x · Wᵀ + b with W stored (out, in), as PyTorch's nn.Linear holds it: converted weights are
    upstream's arrays unchanged. XLA's CPU dots read this layout faster than Flax's (in, out) at
    every row count measured (docs/performance.md, "Weight layout"). Computes in
    `dtype`; with `float32_output` a low-precision product is returned in float32 (accumulated
    in float32), for outputs that feed float32-only stages. A float32 product at full precision
    is six explicit bfloat16 passes on a TPU (`_products.linear`)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = None
    float32_output: bool = False

    @nn.compact
    def __call__(self, x):  # (..., in) -> (..., features)
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        weight = self.param("weight", init, (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        x, weight, bias = nn.dtypes.promote_dtype(x, weight, bias, dtype=self.dtype)
        accumulate = jnp.float32 if self.dtype is not None and self.float32_output else None
        y = linear(x, weight, accumulate)
        return y if bias is None else y + bias


def in_row_blocks(fn, x, max_rows: int | None):
    """`fn`, a position-wise map, over `x`'s rows (every axis but the last) in near-equal blocks
    of at most `max_rows` rows; None: in one go. XLA's CPU matmul slows past about 2000 rows
    (docs/performance.md, "Row blocks").
    Rows are independent, so blocking changes only float rounding."""
    rows = x.size // x.shape[-1]
    if max_rows is None or rows <= max_rows:
        return fn(x)
    flat = x.reshape(rows, x.shape[-1])
    block = math.ceil(rows / math.ceil(rows / max_rows))
    out = jnp.concatenate([fn(flat[start:start + block]) for start in range(0, rows, block)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch (`ls1`/`ls2` upstream, present only with init_values)."""

    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma


class Attention(nn.Module):
    """Multi-head self-attention over one chunk; `mask` (B, L) marks the real tokens."""

    num_heads: int
    qkv_bias: bool
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x, mask):  # x: (B, L, E), mask: (B, L) bool
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = Linear(3 * width, self.qkv_bias, self.dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
        out = attention(q, k, v, mask, head_dim ** -0.5, fused=self.dtype is not None)
        return Linear(width, dtype=self.dtype, name="proj")(out.reshape(batch, length, width))


def key_lengths(mask):
    """(B, L) prefix masks -> (B,) int32 counts, at least 1 (a chunk of pure padding then attends
    to one padding token: finite, and discarded like every padded position)."""
    return jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)


def attention(q, k, v, mask, scale: float, *, fused: bool):
    """Softmax attention of (B, L, H, head_dim) q, k, v over the keys `mask` (B, L) keeps.

    With `fused` (bfloat16/float16 inputs) on a GPU, cuDNN's fused flash attention, the mask given
    as key lengths (every mask here is a prefix: a chunk's real tokens come first); where cuDNN
    is missing or refuses the shapes, and always on CPU and in float32, `heads_major_attention`
    with the boolean mask, and a warning (once per traced program) that says why.
    """
    if fused and jax.default_backend() == "gpu":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                                key_value_seq_lengths=key_lengths(mask),
                                                implementation="cudnn")
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as refusal:
            warnings.warn(f"cuDNN fused attention unavailable ({refusal}); attention runs as "
                          f"XLA's unfused computation", RuntimeWarning, stacklevel=2)
    return heads_major_attention(q, k, v, mask, scale)


def heads_major_attention(q, k, v, mask, scale: float):
    """`jax.nn.dot_product_attention`'s XLA computation (float32 logits and softmax, a masked
    logit set to -0.7 · the float32 maximum, probabilities cast to v's dtype) on q, k, v
    transposed to (B, H, L, head_dim), where XLA's CPU batched matmuls find each head's products
    contiguous (twice as fast on CPU: docs/performance.md, "Layer choices"); float32 results
    agree to rounding (within 1e-6, tested)."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = jnp.einsum("bhld,bhsd->bhls", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :], logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhls,bhsd->bhld", probs, v), 1, 2)


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear, back to the input width."""

    hidden_dim: int
    dtype: Dtype = None
    max_rows: int | None = None  # see `in_row_blocks`

    @nn.compact
    def __call__(self, x):
        fc1 = Linear(self.hidden_dim, dtype=self.dtype, name="fc1")
        fc2 = Linear(x.shape[-1], dtype=self.dtype, name="fc2")
        return in_row_blocks(lambda rows: fc2(gelu(fc1(rows))), x, self.max_rows)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)). Scan-compatible."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    init_values: float | None
    dtype: Dtype = None
    max_rows: int | None = None  # of the MLP at a time, see `in_row_blocks`

    @nn.compact
    def __call__(self, x, mask):  # x: (B, L, E) float32 residual stream
        def scaled(name, y):
            return LayerScale(self.init_values, name=name)(y) if self.init_values is not None else y

        attn = Attention(self.num_heads, self.qkv_bias, self.dtype, name="attn")
        x = x + scaled("ls1", attn(layer_norm(1e-6, "norm1", self.dtype)(x), mask))
        mlp = Mlp(self.mlp_dim, self.dtype, self.max_rows, name="mlp")
        x = x + scaled("ls2", mlp(layer_norm(1e-6, "norm2", self.dtype)(x)))
        return x, None


# Kernel size of the decoder's convolutions (the embedding conv and every depthwise conv).
DECODER_KERNEL = 7


class ConvNeXtBlock(nn.Module):
    """Vocos ConvNeXt block on (B, F, C): depthwise conv k7, norm, MLP, per-channel gain, residual.

    `keep` (B, F, 1) zeroes frames past each sequence's end before the depthwise conv, so that a
    padded batch sees the zero padding upstream's conv sees at a clip's own end. Unpadded
    (`same_padding=False`), the block returns the F − 6 frames whose neighbours are all in `x`:
    streaming passes the frames it kept from earlier steps as the first 6.
    """

    intermediate_dim: int
    layer_scale_init: float
    dtype: Dtype = None
    max_rows: int | None = None  # of the position-wise part at a time, see `in_row_blocks`
    same_padding: bool = True

    @nn.compact
    def __call__(self, x, keep):  # x: (B, F, C) float32 residual stream
        width = x.shape[-1]
        y = DepthwiseConv1d(DECODER_KERNEL, self.dtype, self.same_padding, name="dwconv")(x * keep)
        if not self.same_padding:
            half = DECODER_KERNEL // 2
            x = x[..., half:x.shape[-2] - half, :]
        norm = layer_norm(1e-6, "norm", self.dtype)
        pwconv1 = Linear(self.intermediate_dim, dtype=self.dtype, name="pwconv1")
        pwconv2 = Linear(width, dtype=self.dtype, name="pwconv2")
        y = in_row_blocks(lambda rows: pwconv2(gelu(pwconv1(norm(rows)))), y, self.max_rows)
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (width,))
        return x + gamma * y, None


class DepthwiseConv1d(nn.Module):
    """Depthwise Conv1d with zero "same" padding on (B, F, C), as a sum of shifted products.

    Parameters as `nn.Conv(C, (k,), feature_group_count=C)` holds them (kernel (k, 1, C), bias
    (C,), same initialisers), so checkpoints are unchanged. XLA's CPU grouped convolution is
    far slower than this memory-bound sum (docs/performance.md, "Layer choices"); the sum's
    rounding differs from it by ~1e-7 relative (a different accumulation order).
    """

    kernel_size: int
    dtype: Dtype = None
    same_padding: bool = True  # False: no padding, k − 1 fewer frames out

    @nn.compact
    def __call__(self, x):
        width, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, 1, width))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        padding = (k // 2, k - 1 - k // 2) if self.same_padding else (0, 0)
        padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [padding, (0, 0)])
        frames = padded.shape[-2] - k + 1
        y = padded[..., :frames, :] * kernel[0, 0]
        for tap in range(1, k):
            y = y + padded[..., tap:tap + frames, :] * kernel[tap, 0]
        return y + bias
