"""Spectral front ends and the ISTFT, as pure functions on time-major arrays.

Conventions (docs/architecture.md): periodic Hann windows, centred STFTs with numpy-style reflect padding,
torchaudio's HTK mel filterbank without area normalisation. Arrays are laid out (batch, frames,
bins); upstream's (batch, bins, frames) is a transpose away.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax._products import full_precision_product, product_in_bfloat16_passes


@functools.lru_cache(maxsize=None)
def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window (the torch default), float32."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace as torch fills it: a float32 step, the first half fused-multiply-added
    from `start`, the second half back from `stop`. The filterbank must match torchaudio's bits."""
    start, stop = np.float64(np.float32(start)), np.float64(np.float32(stop))
    step = np.float64(np.float32((stop - start) / (num - 1)))
    index = np.arange(num)
    values = np.where(index < num // 2, start + step * index, stop - step * (num - 1 - index))
    return values.astype(np.float32)


@functools.lru_cache(maxsize=None)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float,
                   f_max: float) -> np.ndarray:
    """HTK-scale triangular filters over the rfft bins, (n_fft // 2 + 1, n_mels), float32.

    Band edges are equally spaced in mel between f_min and f_max; each filter rises and falls
    linearly in Hz between its neighbours' centres, peaking at 1 (no area normalisation). Built in
    float32 like torchaudio's `melscale_fbanks`: a float64 build differs by up to 1e-5 near f_max.
    """
    bins_hz = _linspace_f32(0.0, sample_rate // 2, n_fft // 2 + 1)
    mel_min, mel_max = (2595.0 * np.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    edge_mels = _linspace_f32(mel_min, mel_max, n_mels + 2) / np.float32(2595.0)
    edges_hz = np.float32(700.0) * (np.power(10.0, edge_mels.astype(np.float64)).astype(np.float32)
                                    - np.float32(1.0))
    widths = np.diff(edges_hz)
    offsets = edges_hz[None, :] - bins_hz[:, None]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(np.float32(0.0), np.minimum(rising, falling)).astype(np.float32)


def _dft_angle(n_fft: int) -> np.ndarray:
    """2π·k·t / n_fft for rfft bin k (rows) and sample t (columns), in float64, reduced mod n_fft
    before scaling so that large k·t lose no precision."""
    k, t = np.arange(n_fft // 2 + 1)[:, None], np.arange(n_fft)[None, :]
    return 2.0 * np.pi * ((k * t) % n_fft) / n_fft


@functools.lru_cache(maxsize=None)
def windowed_inverse_dft(n_fft: int) -> np.ndarray:
    """irfft of n_fft points times the Hann window, as one matrix (2 · (n_fft // 2 + 1), n_fft)
    applied to [real parts, imaginary parts]: the ISTFT on the matrix units instead of an FFT.
    Like irfft, it ignores the imaginary parts of the DC and Nyquist bins. Built in float64."""
    k = np.arange(n_fft // 2 + 1)[:, None]
    angle = _dft_angle(n_fft)
    weight = np.where((k == 0) | (k == n_fft // 2), 1.0, 2.0) / n_fft
    window = hann_window(n_fft).astype(np.float64)
    return np.concatenate([weight * np.cos(angle) * window,
                           -weight * np.sin(angle) * window]).astype(np.float32)


def reflect_pad(audio: jax.Array, pad: int) -> jax.Array:
    """(B, N) -> (B, N + 2·pad), mirrored at both ends without the edge sample (numpy/torch
    "reflect")."""
    return jnp.pad(audio, ((0, 0), (pad, pad)), mode="reflect")


def frames(padded: jax.Array, *, n_fft: int, hop: int, num_frames: int,
           offset: int = 0) -> jax.Array:
    """(B, S) -> (B, num_frames, n_fft): frame f is `padded[:, offset + hop·f:][:, :n_fft]`.

    The signal is cut into hop-long blocks and each frame is the concatenation of the few blocks
    it spans, trimmed: reshapes and slices, which a TPU streams, instead of a gather of
    overlapping windows. Samples past the signal's end are zeros (no frame asked for reads them).
    """
    first, shift = divmod(offset, hop)
    spans = -(-(shift + n_fft) // hop)
    batch, length = padded.shape
    end = (first + num_frames + spans - 1) * hop
    padded = jnp.pad(padded, ((0, 0), (0, max(0, end - length))))
    blocks = padded[:, first * hop:end].reshape(batch, num_frames + spans - 1, hop)
    joined = jnp.concatenate([blocks[:, i:i + num_frames] for i in range(spans)], axis=-1)
    return joined[..., shift:shift + n_fft]


@functools.lru_cache(maxsize=None)
def windowed_dft(n_fft: int) -> np.ndarray:
    """The Hann window times the rfft of n_fft points, as one matrix (n_fft, 2 · (n_fft // 2 + 1))
    giving [real parts, imaginary parts] of a frame's spectrum. Built in float64."""
    angle = _dft_angle(n_fft).T
    window = hann_window(n_fft).astype(np.float64)[:, None]
    return np.concatenate([window * np.cos(angle), -window * np.sin(angle)], 1).astype(np.float32)


def _power_by_rfft(frames: jax.Array) -> jax.Array:
    spectrum = jnp.fft.rfft(frames * hann_window(frames.shape[-1]), axis=-1)
    return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2


def _power_by_product(frames: jax.Array) -> jax.Array:
    bins = frames.shape[-1] // 2 + 1
    halves = product_in_bfloat16_passes(frames, windowed_dft(frames.shape[-1]))
    return halves[..., :bins] ** 2 + halves[..., bins:] ** 2


def power_spectrogram(padded: jax.Array, *, n_fft: int, hop: int, num_frames: int,
                      offset: int = 0) -> jax.Array:
    """|STFT|² with a periodic Hann window of frames starting at `offset + hop·f` in an already
    padded signal: (B, S) -> (B, num_frames, n_fft // 2 + 1).

    On CPU and GPU each frame goes through an rfft, which rounds every frame alike whatever the
    batch. A TPU has no FFT unit: its compiler turns an FFT into full-precision products of DFT
    blocks and transposes, so there the frames meet the windowed DFT (`windowed_dft`) in one
    product at full float32 precision (six bfloat16 passes, `_products`), which the compiler
    estimates faster and compiles sooner (docs/planning.md)."""
    windowed = frames(padded, n_fft=n_fft, hop=hop, num_frames=num_frames, offset=offset)
    return jax.lax.platform_dependent(windowed, tpu=_power_by_product, default=_power_by_rfft)


def power_to_db(power: jax.Array, fb: np.ndarray) -> jax.Array:
    """Power mel spectrogram in dB, before the dynamic-range floor: (B, F, bins) -> (B, F, mels)."""
    mel = full_precision_product(power, fb)
    return 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))


def peak_db(db: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Each row's maximum over its real frames: (B, F, mels), (B, F) -> (B,)."""
    return jnp.max(jnp.where(frame_mask[..., None], db, -jnp.inf), axis=(-2, -1))


def floor_db(db: jax.Array, peak: jax.Array, top_db: float = 120.0) -> jax.Array:
    """Floors each row `top_db` below its peak (B,): the per-example floor of the semantic encoder."""
    return jnp.maximum(db, (peak - top_db)[:, None, None])


def log_magnitude_mel(power: jax.Array, fb: np.ndarray) -> jax.Array:
    """The acoustic encoder's input: natural log of the magnitude mel spectrogram."""
    mel = full_precision_product(jnp.sqrt(power), fb)
    return jnp.log(jnp.maximum(mel, 1e-7))


def overlap_add(frames: jax.Array, hop: int) -> jax.Array:
    """(B, F, K·hop) frames -> (B, (F - 1 + K)·hop) signal by summing K shifted copies.

    With the frame length a multiple of the hop, overlap-add is K padded copies added in turn:
    no scatter, which a TPU runs slower than dense adds.
    """
    batch, num_frames, length = frames.shape
    k = length // hop
    pieces = frames.reshape(batch, num_frames, k, hop)
    total = jnp.zeros((batch, num_frames + k - 1, hop), frames.dtype)
    for i in range(k):
        total = total + jnp.pad(pieces[:, :, i], ((0, 0), (i, k - 1 - i), (0, 0)))
    return total.reshape(batch, (num_frames + k - 1) * hop)


def overlap_add_continued(frames: jax.Array, hop: int, pending: jax.Array,
                          done=None) -> tuple[jax.Array, jax.Array]:
    """`overlap_add` of a stream's next frames: `pending` (B, (K - 1)·hop) holds what earlier
    frames added to the hops that follow them. Returns the F·hop samples of these frames' hops
    and the new `pending`, which follows the first `done` frames (default: all F; may be traced,
    when the frames after it are padding)."""
    total = overlap_add(frames, hop)
    total = total.at[:, :pending.shape[1]].add(pending)
    count = frames.shape[1] * hop
    start = count if done is None else done * hop
    return total[:, :count], jax.lax.dynamic_slice_in_dim(total, start, pending.shape[1], axis=1)


def istft_frames(log_magnitude: jax.Array, phase: jax.Array, n_fft: int) -> jax.Array:
    """Each frame's windowed inverse DFT, (B, F, n_fft // 2 + 1) x2 -> (B, F, n_fft): the ISTFT
    before overlap-add, as one matrix product (`windowed_inverse_dft`). The magnitude is capped
    at 100 before synthesis."""
    magnitude = jnp.minimum(jnp.exp(log_magnitude), 100.0)
    halves = jnp.concatenate([magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)], axis=-1)
    return full_precision_product(halves, windowed_inverse_dft(n_fft))


def normalise_overlap(signal: jax.Array, envelope: jax.Array) -> jax.Array:
    """Overlap-added samples divided by the overlap-added squared window; samples that no kept
    frame reaches come out as zeros."""
    covered = envelope > 1e-11
    return jnp.where(covered, signal, 0.0) / jnp.where(covered, envelope, 1.0)


def istft_same(log_magnitude: jax.Array, phase: jax.Array, keep: jax.Array, *, n_fft: int,
               hop: int) -> jax.Array:
    """Vocos' ISTFT with "same" padding: (B, F, n_fft // 2 + 1) x2 -> (B, F · hop).

    Frames (`istft_frames`) are overlap-added, trimmed by (n_fft - hop) / 2 at both ends and
    divided by the overlap-added squared window. `keep` (B, F, 1) drops frames past each
    sequence's end from both sums, so every sequence in a padded batch gets its own window
    envelope.
    """
    frames = istft_frames(log_magnitude, phase, n_fft) * keep
    window = hann_window(n_fft)
    num_frames = frames.shape[1]
    trim = slice((n_fft - hop) // 2, (n_fft - hop) // 2 + num_frames * hop)
    signal = overlap_add(frames, hop)[:, trim]
    envelope = overlap_add(jnp.broadcast_to(window ** 2 * keep, frames.shape), hop)[:, trim]
    return normalise_overlap(signal, envelope)
