"""The inference API: a model value, `encode`, `decode`, `reconstruct`, `load_losatok`.

A `Losatok` is a pytree: its parameters are leaves and its config is static metadata. The jitted
entry points take it as an argument, so parameters are never baked into a compiled program, and a
user can pass a `Losatok` through their own `jit`, `vmap` or `grad`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax._modules import AudioVAE
from losatok_jax.config import LosatokConfig, load_config

FEATURE_KEYS = ("z", "mu", "logvar", "semantic_emb", "acoustic_emb", "unified_emb",
                "semantic_emb_low", "acoustic_emb_low", "unified_emb_low")


@flax.struct.dataclass
class Losatok:
    """LoSATok parameters with the config that shapes them."""

    params: Any
    config: LosatokConfig = flax.struct.field(pytree_node=False)

    @property
    def module(self) -> AudioVAE:
        return AudioVAE(self.config)

    def apply(self, *args, method: str, **kwargs):
        return self.module.apply({"params": self.params}, *args, method=method, **kwargs)


def init_params(config: LosatokConfig, rng: jax.Array) -> Any:
    """Random parameters for `config` (untrained; for tests and debugging)."""
    audio = jnp.zeros((1, config.samples_per_token * 2))
    return jax.jit(AudioVAE(config).init)(rng, audio)["params"]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_float(x, what: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        hint = " (scale integer PCM to [-1, 1] first, e.g. int16 / 32768)" if what == "audio" else ""
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}{hint}")


def _check_finite(x, what: str):
    if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{what} contains NaN or Inf values")


def as_audio_batch(audio, config: LosatokConfig) -> jax.Array:
    """Validates audio shaped (N,), (B, N) or (B, 1, N) and returns it as float32 (B, N)."""
    if not isinstance(audio, jax.Array):
        audio = np.asarray(audio)
    _check_float(audio, "audio")
    if audio.ndim == 1:
        audio = audio[None]
    elif audio.ndim == 3 and audio.shape[1] == 1:
        audio = audio[:, 0]
    elif audio.ndim != 2:
        raise ValueError(f"audio must be shaped (N,), (B, N) or (B, 1, N); got {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError("audio batch is empty")
    if audio.shape[1] < config.min_samples:
        raise ValueError(
            f"audio has {audio.shape[1]} samples; LoSATok needs at least {config.min_samples} "
            f"({1000 * config.min_samples / config.sample_rate:.0f} ms at {config.sample_rate} Hz)")
    _check_finite(audio, "audio")
    return jnp.asarray(audio, jnp.float32)


def _as_latents(z, config: LosatokConfig) -> jax.Array:
    if not isinstance(z, jax.Array):
        z = np.asarray(z)
    _check_float(z, "z")
    if z.ndim != 3 or z.shape[2] != config.decoder_dim:
        raise ValueError(f"z must be shaped (B, T, {config.decoder_dim}); got {z.shape}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"z must hold at least one frame; got {z.shape}")
    _check_finite(z, "z")
    return jnp.asarray(z, jnp.float32)


@jax.jit
def _encode(model: Losatok, audio: jax.Array, rng: jax.Array | None) -> dict[str, jax.Array]:
    noise = None
    if rng is not None:
        shape = (audio.shape[0], model.config.num_tokens(audio.shape[1]), model.config.decoder_dim)
        noise = jax.random.normal(rng, shape, audio.dtype)
    return model.apply(audio, noise=noise, method="encode")


def encode(model: Losatok, audio, *, sample: bool = False,
           rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Audio (N,), (B, N) or (B, 1, N) at 16 kHz -> the nine upstream features, each (B, T, dim).

    `sample=True` draws z = mu + eps · exp(logvar / 2) with eps from `rng`; otherwise z = mu.
    """
    if sample and rng is None:
        raise ValueError("encode(sample=True) needs a PRNG key: pass rng=jax.random.key(seed)")
    features = _encode(model, as_audio_batch(audio, model.config), rng if sample else None)
    return {key: features[key] for key in FEATURE_KEYS}


def log_mels(model: Losatok, audio) -> tuple[jax.Array, jax.Array]:
    """Both front ends' outputs in upstream's layout: semantic (B, 64, F) dB, acoustic (B, 128, F)."""
    features = _encode(model, as_audio_batch(audio, model.config), None)
    return (jnp.swapaxes(features["semantic_log_mel"], 1, 2),
            jnp.swapaxes(features["acoustic_log_mel"], 1, 2))


@jax.jit
def _decode(model: Losatok, z: jax.Array) -> jax.Array:
    return model.apply(z, method="decode")


def decode(model: Losatok, z) -> jax.Array:
    """Latents (B, T, D) -> audio (B, 640 · T) at 16 kHz."""
    return _decode(model, _as_latents(z, model.config))


def reconstruct(model: Losatok, audio, *, sample: bool = False,
                rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """encode then decode: returns (audio (B, 640 · T), features)."""
    features = encode(model, audio, sample=sample, rng=rng)
    return decode(model, features["z"]), features


def load_losatok(path: str | os.PathLike | None = None, *,
                 config_path: str | os.PathLike | None = None, seed: int = 0) -> Losatok:
    """Loads a converted checkpoint directory, or builds an untrained model from a config.

    With `path`, the checkpoint's stored config is used; a `config_path` given as well must agree
    with it. With only `config_path`, parameters are random (a warning says so), as upstream does
    when no weights are given.
    """
    from losatok_jax import checkpoint  # Orbax import is slow; only pay for it when loading.

    if path is not None:
        model = checkpoint.load(path)
        if config_path is not None:
            checkpoint.check_same_config(load_config(config_path), model.config, config_path, path)
        return model
    if config_path is None:
        raise ValueError("load_losatok needs a checkpoint directory or a config_path")
    config = load_config(config_path)
    warnings.warn("no checkpoint given: LoSATok is randomly initialised and untrained",
                  stacklevel=2)
    return Losatok(init_params(config, jax.random.key(seed)), config)
