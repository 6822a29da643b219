"""Float32 matrix products at full precision, as six explicit bfloat16 passes on a TPU.

A TPU multiplies float32 matrices at HIGHEST precision by splitting each operand into three
bfloat16 pieces and accumulating six bfloat16 products in float32, inside one operation. Its
compiler builds that operation several times slower than a plain bfloat16 product and costs it as
one pass (docs/planning.md). Here the same six products are spelled out, stacked along the
contraction into one bfloat16 product: the same precision, compiled sooner and costed for what it
does. CPU and GPU keep their float32 products (no result there changes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
# Pieces (i, j) of the two operands whose products make a float32 one: every pair with i + j < 3
# (the rest lie below float32's rounding), the smallest terms first.
_PASSES = ((2, 0), (0, 2), (1, 1), (1, 0), (0, 1), (0, 0))


def _bfloat16_pieces(x):
    """x (float32) as three bfloat16 arrays whose sum is x to within 2^-24 |x|: each the
    rounding of what the ones before left."""
    pieces, rest = [], x
    for _ in range(3):
        pieces.append(rest.astype(jnp.bfloat16))
        rest = rest - pieces[-1].astype(np.float32)
    return pieces


@jax.custom_vjp
def product_in_bfloat16_passes(x, matrix):
    """x (..., K) · matrix (K, N) to float32 precision: six bfloat16 products accumulated in
    float32, stacked along the contraction into one product (a constant `matrix` is split when
    the program is compiled). Its gradients are the float32 product's, at full precision
    (differentiating the pieces would round them to bfloat16)."""
    xs, ms = _bfloat16_pieces(x), _bfloat16_pieces(jnp.asarray(matrix))
    lhs = jnp.concatenate([xs[i] for i, _ in _PASSES], axis=-1)
    rhs = jnp.concatenate([ms[j] for _, j in _PASSES], axis=0)
    return jnp.matmul(lhs, rhs, preferred_element_type=jnp.float32)


def _full_precision_matmul(x, matrix):
    return jnp.matmul(x, matrix, precision=_HIGHEST)


product_in_bfloat16_passes.defvjp(
    lambda x, matrix: (product_in_bfloat16_passes(x, matrix), (x, matrix)),
    lambda residuals, cotangent: jax.vjp(_full_precision_matmul, *residuals)[1](cotangent))


def full_precision_product(x: jax.Array, matrix: np.ndarray) -> jax.Array:
    """x · matrix (a numpy constant) at full float32 precision on every backend."""
    return jax.lax.platform_dependent(
        x, tpu=lambda x: product_in_bfloat16_passes(x, matrix),
        default=lambda x: _full_precision_matmul(x, matrix))


def _full_precision_in_effect(x) -> bool:
    """Whether float32 `x` is being multiplied at full precision (`model.full_float32_matmuls`)."""
    return x.dtype == jnp.float32 and str(jax.config.jax_default_matmul_precision).lower() in (
        "highest", "float32")


def _linear(x, weight, preferred_element_type=None):
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=preferred_element_type)


def _linear_in_passes(x, weight):
    return product_in_bfloat16_passes(x, weight.T)


def linear(x: jax.Array, weight: jax.Array, preferred_element_type=None) -> jax.Array:
    """x (..., in) · weight (out, in)ᵀ at the matmul precision in effect (a low-precision
    product accumulated in `preferred_element_type`); a float32 product at full precision is six
    bfloat16 passes on a TPU."""
    if not _full_precision_in_effect(x):
        return _linear(x, weight, preferred_element_type)
    return jax.lax.platform_dependent(x, weight, tpu=_linear_in_passes, default=_linear)
