"""The inference API: a model value, `encode`, `decode`, `reconstruct`, `load_losatok`.

A `Losatok` is a pytree: its parameters are leaves and its config is static metadata. The jitted
entry points take it as an argument, so parameters are never baked into a compiled program, and a
user can pass a `Losatok` through their own `jit`, `vmap` or `grad`.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax import _batching
from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax._layers import MATRIX_PARAMS, compute_dtype
from losatok_jax._modules import LAYER_STACKS, LOW_PRECISION_SCOPES, AudioVAE
from losatok_jax.config import LosatokConfig, load_config

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
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}; got {dtype!r}")
    return name


def init_params(config: LosatokConfig, rng: jax.Array) -> Any:
    """Random parameters for `config` (untrained; for tests and debugging)."""
    audio = jnp.zeros((1, config.samples_per_token * 2))
    return jax.jit(AudioVAE(config).init)(rng, audio)["params"]


def _host_or_traced(x):
    """Concrete arrays come to the host as numpy (padding and checks happen there without
    compiling anything); traced arrays from a caller's jit/vmap/grad stay as they are."""
    return x if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_float(x, what: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        hint = " (scale integer PCM to [-1, 1] first, e.g. int16 / 32768)" if what == "audio" else ""
        raise ValueError(f"{what} must be floating point, got dtype {x.dtype}{hint}")


def _check_finite(x, what: str):
    if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values")


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
        raise ValueError(f"audio must be shaped (N,), (B, N) or (B, 1, N); got {audio.shape}")
    if audio.shape[0] == 0:
        raise ValueError("audio batch is empty")
    if audio.shape[1] < config.min_samples:
        raise ValueError(
            f"audio has {audio.shape[1]} samples; LoSATok needs at least {config.min_samples} "
            f"({1000 * config.min_samples / config.sample_rate:.0f} ms at {config.sample_rate} Hz)")
    _check_finite(audio, "audio")
    return _as_float32(audio)


def _as_latents(z, config: LosatokConfig):
    """Validates latents shaped (B, T, D); returns float32, as numpy unless traced."""
    z = _host_or_traced(z)
    _check_float(z, "z")
    if z.ndim != 3 or z.shape[2] != config.decoder_dim:
        raise ValueError(f"z must be shaped (B, T, {config.decoder_dim}); got {z.shape}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"z must hold at least one frame; got {z.shape}")
    _check_finite(z, "z")
    return _as_float32(z)


def _token_noise(rng, clip_ids, token_offsets, num_tokens: int, dim: int):
    """Standard normal draws for sampling, keyed by (clip, token) alone.

    Each latent frame's noise depends only on `rng`, the clip's position in the call and the
    token's index in the clip, so sampling is unchanged by batching, bucketing or windowing.
    """
    def row(clip_id, offset):
        clip_key = jax.random.fold_in(rng, clip_id)
        keys = jax.vmap(lambda t: jax.random.fold_in(clip_key, t))(offset + jnp.arange(num_tokens))
        return jax.vmap(lambda key: jax.random.normal(key, (dim,)))(keys)

    return jax.vmap(row)(clip_ids, token_offsets)


def _noise_for(model, rng, clip_ids, token_offsets, num_tokens):
    if rng is None:
        return None
    return _token_noise(rng, clip_ids, token_offsets, num_tokens, model.config.decoder_dim)


@jax.jit
def _window_peaks(model: Losatok, buffers, valid_frames):
    num_frames = _batching.window_frames(model.config, _window_tokens(model.config, buffers))
    return model.apply(buffers, num_frames, valid_frames, method="semantic_peak_db")


@jax.jit
def _encode_stem(model: Losatok, buffers, valid_frames, peak_db):
    num_frames = _batching.window_frames(model.config, _window_tokens(model.config, buffers))
    return model.apply(buffers, num_frames, valid_frames, peak_db, method="encode_stem")


@functools.partial(jax.jit, static_argnames="keys")
def _encode_finish(model: Losatok, rng, stem, chunks, noise_ids, starts, keys):
    window = stem["acoustic_log_mel"].shape[1] // model.config.frames_per_token
    noise = _noise_for(model, rng, noise_ids, starts, window)
    features = model.apply(stem, chunks, noise, method="encode_finish")
    return {key: features[key] for key in keys}


def _encode_windows(model: Losatok, rng, buffers, valid_frames, peak_db, noise_ids, starts,
                    keys=FEATURE_KEYS, layers=None):
    """Encodes a batch of window buffers (`_window_rows`); `layers` as `_run_stack` takes them."""
    stem = _encode_stem(model, buffers, valid_frames, peak_db)
    chunks = _run_stack(model, "semantic", layers, stem["chunks"], stem["chunk_mask"])
    return _encode_finish(model, rng, stem, chunks, noise_ids, starts, keys)


def _window_tokens(config: LosatokConfig, buffers) -> int:
    """Inverts `window_buffer`'s length."""
    frames = (buffers.shape[1] - 2 * config.front_end_pad) // config.hop_length + 1
    return frames // config.frames_per_token


@jax.jit
def _decode_stem(model: Losatok, z, token_mask):
    return model.apply(z, token_mask, method="decode_stem")


@jax.jit
def _decode_finish(model: Losatok, x, keep):
    return model.apply(x, keep, method="decode_finish")


def _decode_rows(model: Losatok, z, token_mask, layers=None):
    """Decodes a batch of latent rows (B, T, D); `token_mask` (B, T) marks the real latents."""
    x, keep = _decode_stem(model, z, token_mask)
    return _decode_finish(model, _run_stack(model, "decoder", layers, x, keep), keep)


# The programs whose stacked layers a Runner may run one layer at a time (`_run_stack`).
_LAYERED_PROGRAMS = (_encode_windows, _decode_rows)


@functools.partial(jax.jit, static_argnames="stack")
def _scan_stack(model: Losatok, x, mask, stack: str):
    return model.apply(stack, x, mask, method="run_stack")


def _layer(weights, x, mask, *, config: LosatokConfig, dtype: str, stack: str):
    _, layer = LAYER_STACKS[stack]
    block = layer(config, compute_dtype(dtype), cpu_layer=True)
    with full_float32_matmuls():
        return block.apply({"params": weights}, x, mask)[0]


_apply_layer = jax.jit(_layer, static_argnames=("config", "dtype", "stack"))


def _run_stack(model: Losatok, stack: str, layers, x, mask):
    """The layers of `LAYER_STACKS[stack]`: one scan (`layers` None, as always inside a trace:
    pmap or a caller's jit), or one `_apply_layer` call per layer on the separate per-layer
    weights `layers[stack]` (`_per_layer_weights`), which spares XLA's CPU while loop its copy of
    each layer's weights out of the stacked arrays (at 25 tokens, 40% of a transformer block's
    time: `benchmarks/scan_overhead.py`) and runs each layer as `cpu_layer` (long rows' matmuls
    in blocks of `CPU_MATMUL_ROWS`)."""
    if layers is None:
        return _scan_stack(model, x, mask, stack)
    for weights in layers[stack]:
        x = _apply_layer(weights, x, mask, config=model.config, dtype=model.dtype, stack=stack)
    return x


def _params_on_host_cpu(model: Losatok) -> bool:
    """Whether every parameter is a concrete array on one CPU device (or numpy)."""
    def on_cpu(leaf):
        if isinstance(leaf, np.ndarray):
            return True
        return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
                and len(leaf.devices()) == 1 and next(iter(leaf.devices())).platform == "cpu")

    return all(on_cpu(leaf) for leaf in jax.tree.leaves(model.params))


def _stacked_weights(model: Losatok, stack: str):
    tree = model.params
    for key in LAYER_STACKS[stack][0]:
        tree = tree[key]
    return tree


def _per_layer_weights(model: Losatok) -> dict[str, list] | None:
    """Every stack's layers as separate arrays that share the stacked arrays' memory, or None
    where they could not share it (parameters on an accelerator, sharded, or traced).

    On CPU a numpy view of one layer of a stacked array goes through `jax.device_put` without a
    copy (where it is 64-byte aligned, as every large kernel is), so this costs no memory. The
    result is kept while `model` lives: `encode(model, ...)` makes a Runner per call.
    """
    if not _params_on_host_cpu(model):
        return None
    stacked = {stack: _stacked_weights(model, stack) for stack in LAYER_STACKS}
    leaves = jax.tree.leaves(stacked)
    cached = _PER_LAYER_CACHE.get(id(model))
    if cached is None or not all(a is b for a, b in zip(cached[0], leaves)):
        layers = {}
        for stack, weights in stacked.items():
            host = jax.tree.map(np.asarray, weights)
            depth = len(jax.tree.leaves(host)[0])
            layers[stack] = [jax.tree.map(lambda x, i=i: x[i], host) for i in range(depth)]
        if cached is None:
            weakref.finalize(model, _PER_LAYER_CACHE.pop, id(model), None)
        _PER_LAYER_CACHE[id(model)] = cached = (leaves, jax.device_put(layers))
    return cached[1]


# id(model) -> (its stacked weight arrays, their per-layer arrays); an entry leaves with its model,
# and is rebuilt if the model's parameter dict was changed in place.
_PER_LAYER_CACHE: dict[int, tuple[list, dict[str, list]]] = {}


class Runner:
    """Runs the bucketed programs on one device and brings results to the host.

    With parameters on the CPU it runs each stack of layers as one jitted call per layer on
    per-layer views of the stacked weights (`_per_layer_weights`); elsewhere as one scan.
    `losatok_jax.parallel` has runners that spread each batch over several devices; batch buckets
    are per device, so a batch holds `num_devices` times what one device takes.
    """

    num_devices = 1

    def __init__(self, model: Losatok):
        self.model = model
        self.layers = _per_layer_weights(model)

    def run(self, program, shared: tuple, batched: tuple, **static):
        """program(model, *shared, *batched, **static) with host (numpy) results."""
        if program in _LAYERED_PROGRAMS:
            static["layers"] = self.layers
        return jax.device_get(program(self.model, *shared, *batched, **static))


def _encode_clips(runner: Runner, clips: list[np.ndarray], rng, buckets: Buckets,
                  keys: tuple[str, ...], noise_ids: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Encodes 1-D clips of any lengths; returns per clip the `keys` features, each (T_i, dim).

    Every clip is cut into semantic-chunk windows (`_batching.encode_pieces`); a window's row is
    the shortest encode length that holds it. Clips of several windows get their spectrogram
    peak from a first pass over their windows, so the 120 dB floor follows the whole clip.
    """
    c = runner.model.config
    tokens = [c.num_tokens(len(clip)) for clip in clips]
    pieces = [p for i in range(len(clips)) for p in _batching.encode_pieces(c, i, tokens[i])]
    peaks = np.full(len(clips), -np.inf, np.float32)  # -inf: the window's own peak is the clip's
    several = [p for p in pieces if tokens[p.clip] > p.count]
    chunk = c.semantic.chunk_tokens
    for group, size in buckets.batch_groups(several, chunk, runner.num_devices):
        buffers, valid = _window_rows(c, clips, group, chunk, size)
        window_peak = runner.run(_window_peaks, (), (buffers, valid))
        for r, p in enumerate(group):
            peaks[p.clip] = max(peaks[p.clip], window_peak[r])
    outputs = _Outputs(tokens)
    for length, members in _by_length(pieces, lambda p: buckets.encode_length(c, p.count)):
        for group, size in buckets.batch_groups(members, length, runner.num_devices):
            buffers, valid = _window_rows(c, clips, group, length, size)
            filler = [0] * (size - len(group))
            clip_peaks = np.array([peaks[p.clip] for p in group] + filler, np.float32)
            starts = np.array([p.start for p in group] + filler, np.int32)
            ids = _padded_ids(noise_ids, [p.clip for p in group], size)
            out = runner.run(_encode_windows, (rng,), (buffers, valid, clip_peaks, ids, starts),
                             keys=keys)
            for r, p in enumerate(group):
                outputs.place(p.clip, p.start, {k: out[k][r, :p.count] for k in keys})
    return outputs.arrays


def _by_length(pieces, row_length) -> list[tuple[int, list]]:
    """Pieces grouped by the row length each needs, shortest first."""
    groups: dict[int, list] = {}
    for p in pieces:
        groups.setdefault(row_length(p), []).append(p)
    return sorted(groups.items())


def _window_rows(config: LosatokConfig, clips, group, window: int, size: int):
    """A batch of `size` rows of `window`-token buffers for the pieces in `group` (the rest are
    zero filler), and each row's count of real frames."""
    frames = _batching.window_frames(config, window)
    buffers = np.zeros((size, _batching.window_samples(config, window)), np.float32)
    valid = np.full(size, frames, np.int32)
    for r, p in enumerate(group):
        buffers[r] = _batching.window_buffer(config, clips[p.clip], p.start, window)
        valid[r] = min(1 + len(clips[p.clip]) // config.hop_length
                       - p.start * config.frames_per_token, frames)
    return buffers, valid


def _padded_ids(noise_ids: Sequence[int], members: Sequence[int], size: int) -> np.ndarray:
    """Noise ids of a batch's clips, padded with zeros for its filler rows."""
    return np.array([noise_ids[i] for i in members] + [0] * (size - len(members)), np.int32)


class _Outputs:
    """Each clip's results, allocated at full length on its first piece and filled in place, so
    a long clip's output never exists twice (as pieces and as their concatenation)."""

    def __init__(self, lengths: Sequence[int]):
        self.lengths = lengths
        self.arrays: list[Any] = [None] * len(lengths)

    def place(self, clip: int, start: int, piece):
        if self.arrays[clip] is None:
            self.arrays[clip] = jax.tree.map(
                lambda x: np.empty((self.lengths[clip], *x.shape[1:]), x.dtype), piece)
        for out, values in zip(jax.tree.leaves(self.arrays[clip]), jax.tree.leaves(piece)):
            out[start:start + len(values)] = values


def _decode_latents(runner: Runner, latents: list[np.ndarray], buckets: Buckets) -> list[np.ndarray]:
    """Decodes (T_i, D) latent sequences of any lengths; returns (640 · T_i,) audio each."""
    c = runner.model.config
    hop = c.samples_per_token
    outputs = _Outputs([len(z) * hop for z in latents])
    packed = _batching.decode_rows(c, buckets, [len(z) for z in latents])
    for length, members in _by_length(packed, lambda row: row.length):
        for group, size in buckets.batch_groups(members, length, runner.num_devices):
            rows = np.zeros((size, length, c.decoder_dim), np.float32)
            token_mask = np.zeros((size, length), bool)
            for r, row in enumerate(group):
                for p, offset in row.pieces:
                    span = slice(offset, offset + p.stop - p.source)
                    rows[r, span] = latents[p.clip][p.source:p.stop]
                    token_mask[r, span] = True
            audio = runner.run(_decode_rows, (), (rows, token_mask))
            for r, row in enumerate(group):
                for p, offset in row.pieces:
                    begin = (offset + p.start - p.source) * hop
                    outputs.place(p.clip, p.start * hop, audio[r, begin:begin + p.count * hop])
    return outputs.arrays


def warmup(model: Losatok, buckets: Buckets = DEFAULT_BUCKETS, *, sample: bool = False,
           features: Sequence[str] = FEATURE_KEYS, decode_too: bool = True) -> int:
    """Compiles, without running, every program `encode`/`decode` can need for `buckets`.

    Afterwards no input of any length or batch size compiles anything new (with the persistent
    compilation cache enabled, later processes load these instead of compiling). Returns the
    number of programs.
    """
    c = model.config
    spec = jax.ShapeDtypeStruct
    rng = jax.random.key(0) if sample else None
    keys = _feature_keys(features)
    chunk = c.semantic.chunk_tokens
    per_layer = _params_on_host_cpu(model)
    first = jax.tree.leaves(model.params)[0]
    device = next(iter(first.devices())) if isinstance(first, jax.Array) else jax.devices()[0]

    def on_device(shapes):  # one program's outputs, as the next program receives them
        sharding = jax.sharding.SingleDeviceSharding(device)
        return jax.tree.map(lambda x: spec(x.shape, x.dtype, sharding=sharding), shapes)

    def stack(name, x, mask):  # what `Runner(model)` will run for the stack
        if not per_layer:
            return _scan_stack.lower(model, x, mask, name)
        layer = jax.tree.map(lambda w: spec(w.shape[1:], w.dtype), _stacked_weights(model, name))
        return _apply_layer.lower(layer, x, mask, config=c, dtype=model.dtype, stack=name)

    lowered = []
    for b in buckets.batch_sizes:
        ints, floats = spec((b,), jnp.int32), spec((b,), jnp.float32)

        def buffers(window):
            return spec((b, _batching.window_samples(c, window)), jnp.float32)

        if b <= buckets.max_batch(chunk):
            lowered.append(_window_peaks.lower(model, buffers(chunk), ints))
        for k in (k for k in buckets.encode_lengths(c) if b <= buckets.max_batch(k)):
            stem = on_device(jax.eval_shape(_encode_stem, model, buffers(k), ints, floats))
            lowered += [_encode_stem.lower(model, buffers(k), ints, floats),
                        stack("semantic", stem["chunks"], stem["chunk_mask"]),
                        _encode_finish.lower(model, rng, stem, stem["chunks"], ints, ints, keys)]
        for k in (k for k in buckets.num_tokens if decode_too and b <= buckets.max_batch(k)):
            z = spec((b, k, c.decoder_dim), jnp.float32)
            token_mask = spec((b, k), jnp.bool_)
            x, keep = on_device(jax.eval_shape(_decode_stem, model, z, token_mask))
            lowered += [_decode_stem.lower(model, z, token_mask), stack("decoder", x, keep),
                        _decode_finish.lower(model, x, keep)]
    for program in lowered:
        program.compile()
    return len(lowered)


def _clip_list(audio, config: LosatokConfig) -> list[np.ndarray]:
    clips = []
    for i, clip in enumerate(audio):
        clip = _host_or_traced(clip)
        if clip.ndim != 1:
            raise ValueError(f"clip {i} must be 1-D (N,); got shape {clip.shape}")
        try:
            clips.append(as_audio_batch(clip, config)[0])
        except ValueError as e:
            raise ValueError(f"clip {i}: {e}") from None
    if not clips:
        raise ValueError("no clips to encode")
    return clips


def _noise_ids(noise_ids: Sequence[int] | None, count: int) -> list[int]:
    if noise_ids is None:
        return list(range(count))
    if len(noise_ids) != count:
        raise ValueError(f"noise_ids has {len(noise_ids)} entries for {count} clips")
    return [int(i) for i in noise_ids]


def _feature_keys(features: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(features) - set(FEATURE_KEYS))
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {FEATURE_KEYS}; got {features}")
    return tuple(features)


def encode(model: Losatok, audio, *, sample: bool = False, rng: jax.Array | None = None,
           buckets: Buckets = DEFAULT_BUCKETS, features: Sequence[str] = FEATURE_KEYS,
           noise_ids: Sequence[int] | None = None, runner: Runner | None = None):
    """Audio at 16 kHz -> the nine upstream features (or the subset `features`).

    - an array (N,), (B, N) or (B, 1, N) -> a dict of (B, T, dim) arrays;
    - a list of 1-D clips of any lengths -> a list of dicts of (T_i, dim) arrays.
    Each clip's features equal encoding it alone, however it is batched, padded or windowed; long
    clips stream through fixed-size windows in bounded memory, and only the shapes in `buckets`
    are ever compiled. Results are numpy arrays on the host. `sample=True` draws
    z = mu + eps · exp(logvar / 2) with eps from `rng` (keyed by clip position and token, so
    batching does not change it); otherwise z = mu. Inside a caller's jit/vmap/grad (traced
    input) the array is encoded in one piece and the results are traced arrays.
    """
    if sample and rng is None:
        raise ValueError("encode(sample=True) needs a PRNG key: pass rng=jax.random.key(seed)")
    rng = rng if sample else None
    keys = _feature_keys(features)
    runner = runner or Runner(model)
    if isinstance(audio, (list, tuple)):
        clips = _clip_list(audio, model.config)
        return _encode_clips(runner, clips, rng, buckets, keys, _noise_ids(noise_ids, len(clips)))
    batch = as_audio_batch(audio, model.config)
    noise_ids = _noise_ids(noise_ids, batch.shape[0])
    if isinstance(batch, jax.core.Tracer):
        clip_ids = jnp.asarray(noise_ids, jnp.int32)
        noise = _noise_for(model, rng, clip_ids, jnp.zeros_like(clip_ids),
                           model.config.num_tokens(batch.shape[1]))
        out = model.apply(batch, noise, method="encode")
        return {key: out[key] for key in keys}
    per_clip = _encode_clips(runner, list(batch), rng, buckets, keys, noise_ids)
    return {key: np.stack([f[key] for f in per_clip]) for key in keys}


@jax.jit
def _front_ends(model: Losatok, audio):
    features = model.apply(audio, method="encode")
    return features["semantic_log_mel"], features["acoustic_log_mel"]


def log_mels(model: Losatok, audio) -> tuple[jax.Array, jax.Array]:
    """Both front ends' outputs in upstream's layout: semantic (B, 64, F) dB, acoustic (B, 128, F)."""
    semantic, acoustic = _front_ends(model, as_audio_batch(audio, model.config))
    return jnp.swapaxes(semantic, 1, 2), jnp.swapaxes(acoustic, 1, 2)


def decode(model: Losatok, z, *, buckets: Buckets = DEFAULT_BUCKETS,
           runner: Runner | None = None):
    """Latents (B, T, D) -> audio (B, 640 · T); a list of (T_i, D) -> a list of (640 · T_i,).

    Long sequences decode in windows whose halo covers the decoder's receptive field, so the
    result equals decoding the whole sequence at once.
    """
    if isinstance(z, (list, tuple)):
        if not z:
            raise ValueError("no latents to decode")
        latents = []
        for i, x in enumerate(z):
            x = _host_or_traced(x)
            if x.ndim != 2:
                raise ValueError(f"latents {i} must be shaped (T, {model.config.decoder_dim}); "
                                 f"got {x.shape}")
            latents.append(_as_latents(x[None], model.config)[0])
        return _decode_latents(runner or Runner(model), latents, buckets)
    z = _as_latents(z, model.config)
    if isinstance(z, jax.core.Tracer):
        return model.apply(z, method="decode")
    return np.stack(_decode_latents(runner or Runner(model), list(z), buckets))


def reconstruct(model: Losatok, audio, *, sample: bool = False, rng: jax.Array | None = None,
                buckets: Buckets = DEFAULT_BUCKETS, features: Sequence[str] = FEATURE_KEYS,
                runner: Runner | None = None):
    """encode then decode: (audio, features), shaped as `encode` and `decode` return them.

    `features` (which must include "z") chooses what comes back besides the audio; ("z",) keeps
    memory small for hours of audio.
    """
    if "z" not in features:
        raise ValueError("reconstruct needs 'z' among the features it computes")
    features = encode(model, audio, sample=sample, rng=rng, buckets=buckets, features=features,
                      runner=runner)
    if isinstance(features, list):
        return decode(model, [f["z"] for f in features], buckets=buckets, runner=runner), features
    return decode(model, features["z"], buckets=buckets, runner=runner), features


def load_losatok(path: str | os.PathLike | None = None, *,
                 config_path: str | os.PathLike | None = None, seed: int = 0,
                 dtype: str = "float32") -> Losatok:
    """Loads a converted checkpoint directory, or builds an untrained model from a config.

    With `path`, the checkpoint's stored config is used; a `config_path` given as well must agree
    with it. With only `config_path`, parameters are random (a warning says so), as upstream does
    when no weights are given. `dtype` "bfloat16" gives `model.astype("bfloat16")` (see Losatok).
    """
    from losatok_jax import checkpoint  # Orbax import is slow; only pay for it when loading.

    dtype = _dtype_name(dtype)
    if path is not None:
        model = checkpoint.load(path)
        if config_path is not None:
            checkpoint.check_same_config(load_config(config_path), model.config, config_path, path)
        return model if dtype == "float32" else model.astype(dtype)
    if config_path is None:
        raise ValueError("load_losatok needs a checkpoint directory or a config_path")
    config = load_config(config_path)
    warnings.warn("no checkpoint given: LoSATok is randomly initialised and untrained",
                  stacklevel=2)
    model = Losatok(init_params(config, jax.random.key(seed)), config)
    return model if dtype == "float32" else model.astype(dtype)
