"""The jitted programs a runner executes: encode and decode cut into stages around the stacks of
repeated layers, so that a runner can run a stack as one scan or one layer at a time.

    window_peaks                          a long clip's spectrogram peak, window by window
    encode_stem -> a stack -> encode_finish      one batch of encode windows
    decode_stem -> a stack -> decode_finish      one batch of packed decode rows
    scan_stack | apply_layer              a stack as one scan, or one layer of it

Every program takes the `Losatok` as its first argument (a pytree: parameters are inputs, never
constants). Shapes come from the batch plan (`_batching`), so each program compiles once per
bucket.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from losatok_jax import _batching
from losatok_jax._layers import compute_dtype
from losatok_jax._modules import LAYER_STACKS
from losatok_jax.config import LosatokConfig
from losatok_jax.model import Losatok, full_float32_matmuls


def token_noise(rng, clip_ids, token_offsets, num_tokens: int, dim: int):
    """Standard normal draws for sampling, keyed by (clip, token) alone.

    Each latent frame's noise depends only on `rng`, the clip's id and the token's index in the
    clip, so sampling is unchanged by batching, bucketing or windowing.
    """
    def row(clip_id, offset):
        clip_key = jax.random.fold_in(rng, clip_id)
        keys = jax.vmap(lambda t: jax.random.fold_in(clip_key, t))(offset + jnp.arange(num_tokens))
        return jax.vmap(lambda key: jax.random.normal(key, (dim,)))(keys)

    return jax.vmap(row)(clip_ids, token_offsets)


def noise_for(model: Losatok, rng, clip_ids, token_offsets, num_tokens: int):
    """`token_noise` for `model`'s latent width; None (z = mu) without `rng`."""
    if rng is None:
        return None
    return token_noise(rng, clip_ids, token_offsets, num_tokens, model.config.decoder_dim)


def window_tokens(config: LosatokConfig, buffers) -> int:
    """Inverts `_batching.window_samples`: the window length of a batch of buffers."""
    frames = (buffers.shape[1] - 2 * config.front_end_pad) // config.hop_length + 1
    return frames // config.frames_per_token


@jax.jit
def window_peaks(model: Losatok, buffers, valid_frames):
    num_frames = _batching.window_frames(model.config, window_tokens(model.config, buffers))
    return model.apply(buffers, num_frames, valid_frames, method="semantic_peak_db")


@jax.jit
def encode_stem(model: Losatok, buffers, valid_frames, peak_db):
    num_frames = _batching.window_frames(model.config, window_tokens(model.config, buffers))
    return model.apply(buffers, num_frames, valid_frames, peak_db, method="encode_stem")


@functools.partial(jax.jit, static_argnames="keys")
def encode_finish(model: Losatok, rng, stem, chunks, noise_ids, starts, keys):
    window = stem["acoustic_log_mel"].shape[1] // model.config.frames_per_token
    noise = noise_for(model, rng, noise_ids, starts, window)
    features = model.apply(stem, chunks, noise, method="encode_finish")
    return {key: features[key] for key in keys}


@jax.jit
def decode_stem(model: Losatok, z, token_mask):
    return model.apply(z, token_mask, method="decode_stem")


@jax.jit
def decode_finish(model: Losatok, x, keep):
    return model.apply(x, keep, method="decode_finish")


@functools.partial(jax.jit, static_argnames="stack")
def scan_stack(model: Losatok, x, mask, stack: str):
    """Every layer of `LAYER_STACKS[stack]` as one scan over the stacked weights."""
    return model.apply(stack, x, mask, method="run_stack")


@functools.partial(jax.jit, static_argnames=("config", "dtype", "stack", "max_rows"))
def apply_layer(weights, x, mask, *, config: LosatokConfig, dtype: str, stack: str,
                max_rows: int | None):
    """One layer of `LAYER_STACKS[stack]` with its own `weights` (one layer's slice)."""
    _, layer = LAYER_STACKS[stack]
    block = layer(config, compute_dtype(dtype), max_rows)
    with full_float32_matmuls():
        return block.apply({"params": weights}, x, mask)[0]


@jax.jit
def front_ends(model: Losatok, audio):
    features = model.apply(audio, method="encode")
    return features["semantic_log_mel"], features["acoustic_log_mel"]
