"""Streaming decode: audio out while latents are still arriving, equal to decoding them whole.

    decoder = StreamingDecoder(model)             # exact; audio trails the latents by 0.81 s
    for z_chunk in generate():                    # (1, t, 128), any t
        play(decoder.push(z_chunk))               # (1, n): the audio now final
    play(decoder.flush())                         # the rest; the decoder is ready for the next

The decoder has no attention. A latent becomes `upsample_tokens` frames (a transposed
convolution whose kernel equals its stride: no context); then come a k7 convolution and
`decoder_depth` ConvNeXt blocks with k7 depthwise convolutions (each looks 3 frames ahead) and an
ISTFT whose frames reach (n_fft - hop) / 2 samples ahead of the hop they are centred on. So a
sample is final once the frames `right_context_samples` later have arrived, and each stage can
run on new frames only: it keeps the last k - 1 frames of its input (the ISTFT, the sums its
frames left for the hops ahead) as state.

`init` and `step` are pure and jittable, for decoding inside a generation loop; `step`'s audio is
the stream delayed by `right_context_samples`, zeros before the stream starts and after it ends.
`StreamingDecoder` runs them for a batch of streams in chunks of `CHUNK_SIZES` latents, the only
shapes compiled: a push runs as steps of the largest size, then one step of the smallest size
that holds the rest, padded (each step reads every weight once, so fewer steps cost less), and
returns exactly the samples that are final.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax import spectral
from losatok_jax._layers import DECODER_KERNEL, Linear, compute_dtype, layer_norm
from losatok_jax._modules import ConvTranspose1d, decoder_block
from losatok_jax.config import LosatokConfig
from losatok_jax.errors import LosatokError
from losatok_jax.model import Losatok, full_float32_matmuls
from losatok_jax.runners import per_layer_weights, stacked_weights

# Latents per step: the only step shapes compiled (a push's rest is padded to the next one).
CHUNK_SIZES = (32, 16, 8, 4, 2, 1)
_CONTEXT = DECODER_KERNEL - 1  # input frames a k7 convolution keeps from earlier steps
_NOT_ENDED = 1 << 30  # frames: a sentinel far from int32 overflow in position arithmetic


def right_context_samples(config: LosatokConfig) -> int:
    """How far a decoded sample depends on later latents' audio, in samples: the ConvNeXt
    blocks and the embedding convolution look DECODER_KERNEL // 2 frames ahead each, and the
    ISTFT (n_fft - hop) / 2 samples ahead of a frame's hop."""
    frames = (1 + config.decoder_depth) * (DECODER_KERNEL // 2)
    return frames * config.istft_hop + (config.istft_n_fft - config.istft_hop) // 2


def right_context_tokens(config: LosatokConfig) -> int:
    """The exact right receptive field in latents: a latent's audio is final once this many
    later latents have arrived (21 for the released model: 12960 samples, 0.81 s)."""
    return -(-right_context_samples(config) // config.samples_per_token)


@flax.struct.dataclass
class StreamState:
    """What a batch of streams carries between steps (every leaf has the batch as leading axis)."""

    embed_inputs: jax.Array  # (B, 6, E) the embedding convolution's last input frames
    block_inputs: jax.Array  # (B, depth, 6, C) each ConvNeXt block's last input frames
    signal: jax.Array  # (B, n_fft - hop) overlap-added samples still awaiting later frames
    envelope: jax.Array  # (B, n_fft - hop) the same sums of the squared window
    frames: jax.Array  # (B,) int32 decoder frames taken so far
    end: jax.Array  # (B,) int32 the stream's length in frames once ended, else 2^30


def init(model: Losatok, batch_size: int = 1) -> StreamState:
    """The state of `batch_size` streams that have not started."""
    c = model.config
    pending = c.istft_n_fft - c.istft_hop
    return StreamState(
        embed_inputs=jnp.zeros((batch_size, _CONTEXT, c.embed_dim), jnp.float32),
        block_inputs=jnp.zeros((batch_size, c.decoder_depth, _CONTEXT, c.decoder_embed_dim),
                               jnp.float32),
        signal=jnp.zeros((batch_size, pending), jnp.float32),
        envelope=jnp.zeros((batch_size, pending), jnp.float32),
        frames=jnp.zeros((batch_size,), jnp.int32),
        end=jnp.full((batch_size,), _NOT_ENDED, jnp.int32))


def end(state: StreamState, rows=None) -> StreamState:
    """Ends the streams of `rows` ((B,) bool; None: all) where they stand: later steps treat
    their latents as absent, and after `right_context_tokens` more latents (any values) their
    audio has all come out; then they give zeros."""
    rows = True if rows is None else rows
    return state.replace(end=jnp.where(rows, jnp.minimum(state.end, state.frames), state.end))


def restart(model: Losatok, state: StreamState, rows) -> StreamState:
    """`state` with the streams of `rows` ((B,) bool) back at their start; the others go on."""
    fresh = init(model, state.frames.shape[0])
    return _select(rows, fresh, state)


def _select(rows, chosen: StreamState, other: StreamState) -> StreamState:
    return jax.tree.map(lambda a, b: jnp.where(rows.reshape(-1, *[1] * (a.ndim - 1)), a, b),
                        chosen, other)


def _present(first, count: int, end):
    """(B, count) float mask of the frames at positions first .. first + count - 1 that exist:
    not before the stream's start, not at or past `end`."""
    position = first[:, None] + jnp.arange(count)
    return ((position >= 0) & (position < end[:, None])).astype(jnp.float32)


def _audible(first, count: int, end, *, hop: int, shift: int):
    """(B, count · hop) float mask of the samples of `count` hops from frame `first`'s, each hop
    `shift` samples earlier, that lie in the stream (from sample 0 to `end` frames' hops).
    Frame differences are clipped before they are scaled to samples: no int32 overflow."""
    frame = first[:, None] + jnp.arange(count)
    offset = jnp.arange(hop) - shift
    margin = shift // hop + 1

    def in_samples(frames):
        return jnp.clip(frames, -margin, margin)[..., None] * hop + offset

    inside = (in_samples(frame) >= 0) & (in_samples(frame - end[:, None]) < 0)
    return inside.reshape(frame.shape[0], count * hop).astype(jnp.float32)


def step(model: Losatok, state: StreamState, z_chunk, rows=None,
         layers: Sequence | None = None, latents=None) -> tuple[StreamState, jax.Array]:
    """Takes (B, t, D) latents, one chunk per stream; returns the new state and (B, t · 640)
    samples of audio: the stream delayed by `right_context_samples` (zeros before its start and past
    its end). Pure and traceable; each chunk length compiles once.

    `latents` (an int32 scalar, may be traced), if given, says that only the chunk's first
    `latents` latents are real: the rest is padding, which the state skips and whose audio
    (from sample `latents` · 640 on) is zeros.

    `rows` ((B,) bool), if given, advances only those streams (the others keep their state and
    their audio is zeros). `layers` optionally holds the ConvNeXt blocks' weights as one tree
    per layer (the CPU runs them unrolled, without slicing the stacked weights each step);
    otherwise the blocks run as a scan over `model`'s stacked weights.
    """
    c = model.config
    dtype = compute_dtype(model.dtype)
    half, hop = DECODER_KERNEL // 2, c.istft_hop
    tokenizer = model.params["dasheng_tokenizer"]
    backbone = tokenizer["decoder"]["backbone"]
    z_chunk = jnp.asarray(z_chunk, jnp.float32)
    count = z_chunk.shape[1] * c.upsample_tokens
    real = count if latents is None else jnp.asarray(latents, jnp.int32) * c.upsample_tokens
    first = state.frames  # position of the chunk's first frame
    block = decoder_block(c, dtype, same_padding=False)
    with full_float32_matmuls():
        x = ConvTranspose1d(c.embed_dim, c.upsample_tokens).apply(
            {"params": tokenizer["upsampler"]}, z_chunk)
        x = x * _present(first, count, state.end)[..., None]
        inputs = jnp.concatenate([state.embed_inputs, x], axis=1)
        embed = nn.Conv(c.decoder_embed_dim, (DECODER_KERNEL,), padding="VALID", dtype=dtype)
        h = layer_norm(1e-6).apply({"params": backbone["norm"]},
                                   embed.apply({"params": backbone["embed"]}, inputs))

        def layer(h, weights, kept, index):
            """Block `index` on its kept frames and the new ones: it returns the new frames'
            outputs, `half · (index + 2)` frames behind the chunk."""
            frames = jnp.concatenate([kept, h], axis=1)
            present = _present(first - half * (index + 1) - _CONTEXT, frames.shape[1], state.end)
            out = block.apply({"params": weights}, frames, present[..., None])[0]
            return out, _kept(frames, real)

        kept_per_layer = jnp.moveaxis(state.block_inputs, 1, 0)
        if layers is None:
            h, kept = jax.lax.scan(lambda h, xs: layer(h, *xs), h,
                                   (stacked_weights(model, "decoder"), kept_per_layer,
                                    jnp.arange(c.decoder_depth)))
        else:
            kept = []
            for index, weights in enumerate(layers):
                h, frames = layer(h, weights, kept_per_layer[index], index)
                kept.append(frames)
            kept = jnp.stack(kept)
        head = tokenizer["decoder"]["head"]
        h = layer_norm(1e-6, dtype=dtype).apply({"params": backbone["final_layer_norm"]}, h)
        bins = c.istft_n_fft // 2 + 1
        out = Linear(2 * bins, dtype=dtype, float32_output=True).apply({"params": head["out"]}, h)
    behind = half * (1 + c.decoder_depth)  # the ISTFT's frames trail the chunk by this many
    real_frames = (jnp.arange(count) < real).astype(jnp.float32)
    present = (_present(first - behind, count, state.end) * real_frames)[..., None]
    frames = spectral.istft_frames(out[..., :bins], out[..., bins:], c.istft_n_fft) * present
    window = spectral.hann_window(c.istft_n_fft) ** 2
    signal, pending_signal = spectral.overlap_add_continued(frames, hop, state.signal, real)
    envelope, pending_envelope = spectral.overlap_add_continued(
        jnp.broadcast_to(window * present, frames.shape), hop, state.envelope, real)
    audio = spectral.normalise_overlap(signal, envelope)
    audio = audio * _audible(first - behind, count, state.end, hop=hop,
                             shift=(c.istft_n_fft - hop) // 2) * jnp.repeat(real_frames, hop)
    new = StreamState(embed_inputs=_kept(inputs, real), block_inputs=jnp.moveaxis(kept, 0, 1),
                      signal=pending_signal, envelope=pending_envelope,
                      frames=state.frames + real, end=state.end)
    if rows is None:
        return new, audio
    return _select(rows, new, state), jnp.where(rows[:, None], audio, 0.0)


def _kept(frames, real):
    """The last `_CONTEXT` of a convolution's input frames that are real: the window's kept
    frames, then the chunk's `real` new ones (the rest is padding)."""
    return jax.lax.dynamic_slice_in_dim(frames, real, _CONTEXT, axis=1)


_step = jax.jit(step)
_end = jax.jit(end)
_restart = jax.jit(restart)


def _steps(length: int) -> list[tuple[int, int]]:
    """(step size, real latents) for `length` latents: full steps of the largest size, then the
    smallest size that holds the rest."""
    largest = max(CHUNK_SIZES)
    steps = [(largest, largest)] * (length // largest)
    rest = length % largest
    if rest:
        steps.append((min(size for size in CHUNK_SIZES if size >= rest), rest))
    return steps


class StreamingDecoder:
    """Decodes `batch_size` streams of latents as they arrive; see the module's docstring.

    After each `push`, every sample before 640 · (latents pushed − `lookahead_tokens`) has been
    returned. With the default lookahead (the exact right receptive field,
    `right_context_tokens`) everything returned equals `decode` of the whole sequence; a
    smaller one returns audio sooner by decoding the latents so far as if the streams ended
    there (docs/streaming.md gives the error per lookahead), at the cost of that extra decode
    per push.

    Streams share one clock: every push takes the same number of latents for each row. A row
    can finish and start again while the others go on: `end(rows)` returns the rest of those
    rows' audio (their later outputs are zeros) and `reset(rows)` starts a new stream in them,
    whose audio begins `delay_samples` into those rows of later outputs (zeros before).
    """

    def __init__(self, model: Losatok, *, batch_size: int = 1,
                 lookahead_tokens: int | None = None):
        exact = right_context_tokens(model.config)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise LosatokError(f"batch_size must be a positive integer; got {batch_size!r}")
        lookahead = exact if lookahead_tokens is None else lookahead_tokens
        if not isinstance(lookahead, (int, np.integer)) or not 0 <= lookahead <= exact:
            raise LosatokError(f"lookahead_tokens must be an integer from 0 to {exact} (the "
                               f"exact receptive field); got {lookahead_tokens!r}")
        self.model, self.batch_size, self.lookahead_tokens = model, int(batch_size), int(lookahead)
        self._lag = right_context_samples(model.config)  # how far `step`'s audio trails
        layers = per_layer_weights(model)
        self._layers = layers and layers["decoder"]
        self._device = next(iter(jax.tree.leaves(model.params)[0].devices()))
        self.reset()

    @property
    def delay_samples(self) -> int:
        """How far the returned audio trails the latents pushed, in samples."""
        return min(self._lag, self.model.config.samples_per_token * self.lookahead_tokens)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Starts new streams: in every row (None), or in `rows` while the others go on."""
        if rows is None:
            # On the model's device, as `step` leaves it: a state placed anywhere else would
            # compile its own programs.
            self._state = jax.device_put(init(self.model, self.batch_size), self._device)
            self._pushed = 0  # latents per row since every row was reset
            self._returned = 0  # samples per row returned since then
        else:
            self._state = _restart(self.model, self._state, self._rows(rows))

    def push(self, z) -> np.ndarray:
        """(B, t, D) latents, t >= 0 -> (B, n) float32 audio that is now final."""
        z = self._latents(z)
        first = self._stream_sample()
        self._state, audio = self._run(self._state, z)
        self._pushed += z.shape[1]
        out = self._since_returned(audio, first)
        if self.delay_samples < self._lag and z.shape[1]:
            # Low latency: what decoding the latents so far, as if they ended here, gives.
            _, ahead = self._run(_end(self._state), self._no_latents())
            target = (self._pushed - self.lookahead_tokens) * self.model.config.samples_per_token
            out = np.concatenate([out, self._since_returned(ahead, self._stream_sample(),
                                                            target)], axis=1)
        return out

    def flush(self) -> np.ndarray:
        """Ends every stream and returns the rest of its audio; the decoder starts over."""
        out = self._drain(None)
        self.reset()
        return out

    def end(self, rows: Sequence[int]) -> np.ndarray:
        """Ends the streams in `rows` and returns the rest of their audio, (len(rows), n)."""
        mask = self._rows(rows)
        return self._drain(mask)[np.flatnonzero(mask)]

    def warmup(self) -> None:
        """Runs every program this decoder can run once, on zeros, so that no push, flush, end
        or reset compiles anything later; the decoder starts over."""
        for size in CHUNK_SIZES:
            self.push(np.zeros((self.batch_size, size, self.model.config.decoder_dim), np.float32))
        self.end([0])
        self.reset([0])
        self.flush()

    def _stream_sample(self) -> int:
        """The stream sample (per row, since every row was reset) of `step`'s next audio."""
        return self._pushed * self.model.config.samples_per_token - self._lag

    def _drain(self, rows) -> np.ndarray:
        """Ends the streams of `rows` (None: all) and runs them until their audio is out;
        returns every row's audio from the first sample not yet returned to the end."""
        first = self._stream_sample()
        self._state, audio = self._run(_end(self._state, rows), self._no_latents(), rows)
        # Rows left running did not advance: their samples still count as not returned.
        return self._since_returned(audio, first,
                                    self._pushed * self.model.config.samples_per_token,
                                    advance=rows is None)

    def _no_latents(self) -> np.ndarray:
        """Latents to run streams past their end with (their values are never read)."""
        c = self.model.config
        return np.zeros((self.batch_size, right_context_tokens(c), c.decoder_dim), np.float32)

    def _run(self, state: StreamState, z: np.ndarray, rows=None):
        pieces, offset = [], 0
        for size, real in _steps(z.shape[1]):
            chunk = np.zeros((self.batch_size, size, z.shape[2]), np.float32)
            chunk[:, :real] = z[:, offset:offset + real]
            state, audio = _step(self.model, state, chunk, rows, self._layers, np.int32(real))
            pieces.append((audio, real * self.model.config.samples_per_token))
            offset += real
        if not pieces:
            return state, np.zeros((self.batch_size, 0), np.float32)
        return state, np.concatenate([audio[:, :samples] for audio, samples
                                      in jax.device_get(pieces)], axis=1)

    def _since_returned(self, audio: np.ndarray, first: int, stop: int | None = None,
                        advance: bool = True):
        """The samples of `audio` (whose first is stream sample `first`) from the first not yet
        returned up to `stop` (default: all of it), which are then counted as returned unless
        `advance` is False."""
        stop = first + audio.shape[1] if stop is None else min(stop, first + audio.shape[1])
        start = max(self._returned, first)
        if stop <= start:
            return np.zeros((self.batch_size, 0), np.float32)
        if advance:
            self._returned = stop
        return np.ascontiguousarray(audio[:, start - first:stop - first], np.float32)

    def _latents(self, z) -> np.ndarray:
        z = np.asarray(z)
        d = self.model.config.decoder_dim
        if z.ndim != 3 or z.shape[0] != self.batch_size or z.shape[2] != d:
            raise LosatokError(f"z must be shaped ({self.batch_size}, t, {d}) for this decoder; "
                               f"got {z.shape}")
        if not np.issubdtype(z.dtype, np.floating):
            raise LosatokError(f"z must be floating point, got dtype {z.dtype}")
        if not np.isfinite(z).all():
            raise LosatokError("z contains NaN or Inf values")
        return z.astype(np.float32, copy=False)

    def _rows(self, rows: Sequence[int]) -> np.ndarray:
        index = np.asarray(rows)
        if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer) \
                or index.min() < 0 or index.max() >= self.batch_size:
            raise LosatokError(f"rows must be a non-empty list of row indices below "
                               f"{self.batch_size}; got {rows!r}")
        mask = np.zeros(self.batch_size, bool)
        mask[index] = True
        return mask
