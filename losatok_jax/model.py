"""The model as a value: `Losatok` (parameters + config + compute dtype) and `init_params`.

A `Losatok` is a pytree: its parameters are leaves and its config is static metadata. Every jitted
program takes it as an argument, so parameters are never baked into a compiled program, and a
user can pass a `Losatok` through their own `jit`, `vmap` or `grad`. How programs run (batching,
devices) is elsewhere: `runners` and `api`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from losatok_jax._layers import MATRIX_PARAMS
from losatok_jax._modules import LOW_PRECISION_SCOPES, AudioVAE
from losatok_jax.config import LosatokConfig
from losatok_jax.errors import LosatokError

FEATURE_KEYS = ("z", "mu", "logvar", "semantic_emb", "acoustic_emb", "unified_emb",
                "semantic_emb_low", "acoustic_emb_low", "unified_emb_low")


@flax.struct.dataclass
class Losatok:
    """LoSATok parameters with the config that shapes them, and the compute dtype.

    `dtype` "float32" (the default) is the exact port. "bfloat16" runs the transformer blocks and
    the Vocos decoder's matmuls and convolutions in bfloat16 (float32 residual streams, LayerNorm
    statistics, GELU, attention softmax, front ends, ISTFT; outputs stay float32): use
    `model.astype("bfloat16")` or `load_losatok(path, dtype="bfloat16")`, which also store those
    layers' weights in bfloat16 (half the memory). `config` and `dtype` are static: jitted
    functions compile once per (config, dtype).
    """

    params: Any
    config: LosatokConfig = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

    @property
    def sample_rate(self) -> int:
        """The audio rate the model takes and gives (16 kHz for the released model)."""
        return self.config.sample_rate

    @property
    def module(self) -> AudioVAE:
        return AudioVAE(self.config, dtype=self.dtype)

    def astype(self, dtype) -> "Losatok":
        """This model computing in `dtype`, with the weights and kernels of the layers that compute
        in it (`_modules.LOW_PRECISION_SCOPES`) stored in it; every other parameter stays float32.
        `astype("float32")` restores float32 storage (values already rounded stay rounded)."""
        dtype = _dtype_name(dtype)

        def cast(path, leaf):
            names = tuple(getattr(k, "key", str(k)) for k in path)
            low = names[-1] in MATRIX_PARAMS and any(names[:len(scope)] == scope
                                                     for scope in LOW_PRECISION_SCOPES)
            return leaf.astype(dtype if low else jnp.float32) if hasattr(leaf, "astype") else leaf

        return Losatok(jax.tree_util.tree_map_with_path(cast, self.params), self.config, dtype)

    def apply(self, *args, method: str, **kwargs):
        with full_float32_matmuls():
            return self.module.apply({"params": self.params}, *args, method=method, **kwargs)


def full_float32_matmuls():
    """Context in which the model is traced: float32 dot products and convolutions at full float32
    precision on every backend, as upstream computes them. JAX's default lets a GPU round their
    inputs to TF32 and a TPU to one bfloat16 pass (relative rounding 2^-11 and 2^-8); a precision
    the caller set with `jax.default_matmul_precision` is kept. On CPU no result changes."""
    return jax.default_matmul_precision(jax.config.jax_default_matmul_precision or "highest")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in COMPUTE_DTYPES:
        raise LosatokError(f"dtype must be one of {COMPUTE_DTYPES}; got {dtype!r}")
    return name


def init_params(config: LosatokConfig, rng: jax.Array) -> Any:
    """Random parameters for `config` (untrained; for tests and debugging)."""
    audio = jnp.zeros((1, config.samples_per_token * 2))
    return jax.jit(AudioVAE(config).init)(rng, audio)["params"]
