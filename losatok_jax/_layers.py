"""Building blocks shared by the LoSATok modules: norms, the transformer block, the ConvNeXt block.

Shape letters: B batch, L tokens in a chunk, F decoder frames, E/C widths, H heads.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Exact (erf) GELU, as upstream; jax.nn.gelu defaults to the tanh approximation.
gelu = functools.partial(nn.gelu, approximate=False)


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    """LayerNorm with two-pass variance, as PyTorch computes it."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


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

    @nn.compact
    def __call__(self, x, mask):  # x: (B, L, E), mask: (B, L) bool
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, use_bias=self.qkv_bias, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                           scale=head_dim ** -0.5)
        return nn.Dense(width, name="proj")(out.reshape(batch, length, width))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear, back to the input width."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        hidden = gelu(nn.Dense(self.hidden_dim, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(hidden)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x)). Scan-compatible."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool
    init_values: float | None

    @nn.compact
    def __call__(self, x, mask):
        def scaled(name, y):
            return LayerScale(self.init_values, name=name)(y) if self.init_values is not None else y

        attn = Attention(self.num_heads, self.qkv_bias, name="attn")
        x = x + scaled("ls1", attn(layer_norm(1e-6, "norm1")(x), mask))
        x = x + scaled("ls2", Mlp(self.mlp_dim, name="mlp")(layer_norm(1e-6, "norm2")(x)))
        return x, None


class ConvNeXtBlock(nn.Module):
    """Vocos ConvNeXt block on (B, F, C): depthwise conv k7, norm, MLP, per-channel gain, residual.

    `keep` (B, F, 1) zeroes frames past each sequence's end before the depthwise conv, so that a
    padded batch sees the zero padding upstream's conv sees at a clip's own end.
    """

    intermediate_dim: int
    layer_scale_init: float

    @nn.compact
    def __call__(self, x, keep):
        width = x.shape[-1]
        y = nn.Conv(width, (7,), padding=[(3, 3)], feature_group_count=width, name="dwconv")(x * keep)
        y = layer_norm(1e-6, "norm")(y)
        y = nn.Dense(width, name="pwconv2")(gelu(nn.Dense(self.intermediate_dim, name="pwconv1")(y)))
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (width,))
        return x + gamma * y, None
