"""The Python API: `encode`, `decode`, `reconstruct`, `log_mels`, `warmup`, `load_losatok` and
`StreamingDecoder`.

Inputs are validated here, on the host, with messages that name the offending clip; then a batch
plan runs them (`_execution`) on a runner (default: one device). Inside a caller's jit, vmap or
grad (traced input) the model is applied directly, in one piece.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax import _execution, _programs
from losatok_jax._devices import resolve_device
from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax._execution import Progress
from losatok_jax.config import LosatokConfig, load_config
from losatok_jax.errors import LosatokError
from losatok_jax.model import FEATURE_KEYS, Losatok, _dtype_name, init_params
from losatok_jax.runners import Runner
from losatok_jax.streaming import StreamingDecoder


def _host_or_traced(x):
    """Concrete arrays come to the host as numpy (padding and checks happen there without
    compiling anything); traced arrays from a caller's jit/vmap/grad stay as they are."""
    return x if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_float(x, what: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        hint = " (scale integer PCM to [-1, 1] first, e.g. int16 / 32768)" if what == "audio" else ""
        raise LosatokError(f"{what} must be floating point, got dtype {x.dtype}{hint}")


def _check_finite(x, what: str):
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise LosatokError(f"{what} contains NaN or Inf values")


def _as_float32(x):
    if isinstance(x, jax.core.Tracer):
        return x.astype(jnp.float32)
    return x.astype(np.float32, copy=False)  # hours of float32 audio are not copied


def as_audio_batch(audio, config: LosatokConfig):
    """Validates audio shaped (N,), (B, N) or (B, 1, N); returns float32 (B, N), as numpy unless
    traced."""
    audio = _host_or_traced(audio)
    _check_float(audio, "audio")
    if audio.ndim == 1:
        audio = audio[None]
    elif audio.ndim == 3 and audio.shape[1] == 1:
        audio = audio[:, 0]
    elif audio.ndim != 2:
        raise LosatokError(f"audio must be shaped (N,), (B, N) or (B, 1, N); got {audio.shape}")
    if audio.shape[0] == 0:
        raise LosatokError("audio batch is empty")
    if audio.shape[1] < config.min_samples:
        raise LosatokError(
            f"audio has {audio.shape[1]} samples; LoSATok needs at least {config.min_samples} "
            f"({1000 * config.min_samples / config.sample_rate:.0f} ms at {config.sample_rate} Hz)")
    _check_finite(audio, "audio")
    return _as_float32(audio)


def _as_latents(z, config: LosatokConfig):
    """Validates latents shaped (B, T, D); returns float32, as numpy unless traced."""
    z = _host_or_traced(z)
    _check_float(z, "z")
    if z.ndim != 3 or z.shape[2] != config.decoder_dim:
        raise LosatokError(f"z must be shaped (B, T, {config.decoder_dim}); got {z.shape}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise LosatokError(f"z must hold at least one frame; got {z.shape}")
    _check_finite(z, "z")
    return _as_float32(z)


def _clip_list(audio, config: LosatokConfig) -> list[np.ndarray]:
    clips = []
    for i, clip in enumerate(audio):
        clip = _host_or_traced(clip)
        if clip.ndim != 1:
            raise LosatokError(f"clip {i} must be 1-D (N,); got shape {clip.shape}")
        try:
            clips.append(as_audio_batch(clip, config)[0])
        except ValueError as e:
            raise LosatokError(f"clip {i}: {e}") from None
    if not clips:
        raise LosatokError("no clips to encode")
    return clips


def _noise_ids(noise_ids: Sequence[int] | None, count: int) -> list[int]:
    if noise_ids is None:
        return list(range(count))
    if len(noise_ids) != count:
        raise LosatokError(f"noise_ids has {len(noise_ids)} entries for {count} clips")
    return [int(i) for i in noise_ids]


def _feature_keys(features: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(features) - set(FEATURE_KEYS))
    if unknown or not features:
        raise LosatokError(f"features must be a non-empty subset of {FEATURE_KEYS}; got {features}")
    return tuple(features)


def warmup(model: Losatok, buckets: Buckets = DEFAULT_BUCKETS, *, sample: bool = False,
           features: Sequence[str] = FEATURE_KEYS, decode_too: bool = True,
           runner: Runner | None = None, stream_batch_sizes: Sequence[int] = ()) -> int:
    """Compiles, without running, every program `encode`/`decode` can need for `buckets`, and
    runs a `StreamingDecoder` of each of `stream_batch_sizes` once on zeros.

    Afterwards no input of any length or batch size, and no stream of those batch sizes,
    compiles anything new (with the persistent compilation cache enabled, later processes load
    these instead of compiling). Returns the number of encode/decode programs.
    """
    for batch_size in stream_batch_sizes:
        StreamingDecoder(model, batch_size=batch_size).warmup()
    return _execution.warmup(runner or Runner(model), buckets, sample=sample,
                             keys=_feature_keys(features), decode_too=decode_too)


def encode(model: Losatok, audio, *, sample: bool = False, rng: jax.Array | None = None,
           buckets: Buckets = DEFAULT_BUCKETS, features: Sequence[str] = FEATURE_KEYS,
           noise_ids: Sequence[int] | None = None, runner: Runner | None = None,
           progress: Progress | None = None):
    """Audio at 16 kHz -> the nine upstream features (or the subset `features`).

    - an array (N,), (B, N) or (B, 1, N) -> a dict of (B, T, dim) arrays;
    - a list of 1-D clips of any lengths -> a list of dicts of (T_i, dim) arrays.
    Each clip's features equal encoding it alone, however it is batched, padded or windowed; long
    clips stream through fixed-size windows in bounded memory, and only the shapes in `buckets`
    are ever compiled. Results are numpy arrays on the host. `sample=True` draws
    z = mu + eps · exp(logvar / 2) with eps from `rng` (keyed by clip position and token, so
    batching does not change it); otherwise z = mu. Inside a caller's jit/vmap/grad (traced
    input) the array is encoded in one piece and the results are traced arrays.
    `progress(stage, batches_done, batches_total)`, if given, is called after every batch.
    """
    if sample and rng is None:
        raise LosatokError("encode(sample=True) needs a PRNG key: pass rng=jax.random.key(seed)")
    rng = rng if sample else None
    keys = _feature_keys(features)
    runner = runner or Runner(model)
    if isinstance(audio, (list, tuple)):
        clips = _clip_list(audio, model.config)
        return _execution.encode_clips(runner, clips, rng, buckets, keys,
                                       _noise_ids(noise_ids, len(clips)), progress)
    batch = as_audio_batch(audio, model.config)
    noise_ids = _noise_ids(noise_ids, batch.shape[0])
    if isinstance(batch, jax.core.Tracer):
        clip_ids = jnp.asarray(noise_ids, jnp.int32)
        noise = _programs.noise_for(model, rng, clip_ids, jnp.zeros_like(clip_ids),
                                    model.config.num_tokens(batch.shape[1]))
        out = model.apply(batch, noise, method="encode")
        return {key: out[key] for key in keys}
    per_clip = _execution.encode_clips(runner, list(batch), rng, buckets, keys, noise_ids,
                                       progress)
    return {key: np.stack([f[key] for f in per_clip]) for key in keys}


def log_mels(model: Losatok, audio) -> tuple[jax.Array, jax.Array]:
    """Both front ends' outputs in upstream's layout: semantic (B, 64, F) dB, acoustic (B, 128, F)."""
    semantic, acoustic = _programs.front_ends(model, as_audio_batch(audio, model.config))
    return jnp.swapaxes(semantic, 1, 2), jnp.swapaxes(acoustic, 1, 2)


def decode(model: Losatok, z, *, buckets: Buckets = DEFAULT_BUCKETS,
           runner: Runner | None = None, progress: Progress | None = None):
    """Latents (B, T, D) -> audio (B, 640 · T); a list of (T_i, D) -> a list of (640 · T_i,).

    Long sequences decode in windows whose halo covers the decoder's receptive field, so the
    result equals decoding the whole sequence at once. `progress` as for `encode`.
    """
    if isinstance(z, (list, tuple)):
        if not z:
            raise LosatokError("no latents to decode")
        latents = []
        for i, x in enumerate(z):
            x = _host_or_traced(x)
            if x.ndim != 2:
                raise LosatokError(f"latents {i} must be shaped (T, {model.config.decoder_dim}); "
                                 f"got {x.shape}")
            latents.append(_as_latents(x[None], model.config)[0])
        return _execution.decode_latents(runner or Runner(model), latents, buckets, progress)
    z = _as_latents(z, model.config)
    if isinstance(z, jax.core.Tracer):
        return model.apply(z, method="decode")
    return np.stack(_execution.decode_latents(runner or Runner(model), list(z), buckets,
                                              progress))


def reconstruct(model: Losatok, audio, *, sample: bool = False, rng: jax.Array | None = None,
                buckets: Buckets = DEFAULT_BUCKETS, features: Sequence[str] = FEATURE_KEYS,
                runner: Runner | None = None, progress: Progress | None = None):
    """encode then decode: (audio, features), shaped as `encode` and `decode` return them.

    `features` (which must include "z") chooses what comes back besides the audio; ("z",) keeps
    memory small for hours of audio. `progress` as for `encode`.
    """
    if "z" not in features:
        raise LosatokError("reconstruct needs 'z' among the features it computes")
    features = encode(model, audio, sample=sample, rng=rng, buckets=buckets, features=features,
                      runner=runner, progress=progress)
    z = [f["z"] for f in features] if isinstance(features, list) else features["z"]
    return decode(model, z, buckets=buckets, runner=runner, progress=progress), features


def load_losatok(path: str | os.PathLike | None = None, *,
                 config_path: str | os.PathLike | None = None,
                 model_path: str | os.PathLike | None = None,
                 device: str | jax.Device | None = None, seed: int = 0,
                 dtype: str = "float32") -> Losatok:
    """Loads a model: upstream's call (`model_path=`, `config_path=`, `device=`) or a converted
    checkpoint folder as the first argument.

    `model_path` (or `path`) is a converted checkpoint folder or upstream's `.pth` (converted once
    into `<name>.orbax/` beside it, then reused). A checkpoint's stored config is used; a
    `config_path` given as well must agree with it (for a `.pth`, it is the config the conversion
    applies). With only `config_path`, parameters are random (a warning says so), as upstream
    does when no weights are given. `device` ("cpu", "cuda"/"gpu", "tpu", optionally ":index", or
    a `jax.Device`) is where the parameters are placed; default: JAX's default device.
    `dtype` "bfloat16" gives `model.astype("bfloat16")` (see Losatok).
    """
    from losatok_jax import _model_source, checkpoint  # Orbax's import is slow: paid on loading

    if path is not None and model_path is not None:
        raise LosatokError("load_losatok takes the checkpoint once: as its first argument or as "
                         "model_path=, not both")
    path = model_path if path is None else path
    dtype = _dtype_name(dtype)
    placement = resolve_device(device)
    if path is not None:
        _model_source.check_exists(str(path), "model_path")
        path, config_path = _model_source.resolve(str(path), config_path)
        model = checkpoint.load(path)
        if config_path is not None:
            checkpoint.check_same_config(load_config(config_path), model.config, config_path, path)
    elif config_path is None:
        raise LosatokError("load_losatok needs a checkpoint (model_path) or a config_path")
    else:
        config = load_config(config_path)
        warnings.warn("no checkpoint given: LoSATok is randomly initialised and untrained",
                      stacklevel=2)
        model = Losatok(init_params(config, jax.random.key(seed)), config)
    model = model if dtype == "float32" else model.astype(dtype)
    return model if placement is None else jax.device_put(model, placement)
