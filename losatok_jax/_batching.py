"""Host-side planning: which padded shapes the jitted entry points see, and where clips go.

Every call is cut into *pieces* placed in rows of a few fixed shapes (batch and length buckets), so
compilation is bounded however varied the inputs are. Clips up to the largest length bucket are one
piece each. Longer clips are cut into windows that are exact by construction:
- encoding: windows of whole semantic chunks (the encoder attends within a chunk only; the acoustic
  path is frame-local), each with the clip's own samples around it, and a first pass that finds
  the clip's spectrogram peak for the 120 dB floor;
- decoding: windows with a halo of latents on both sides covering the decoder's receptive field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

from losatok_jax.config import LosatokConfig


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes compiled: batch sizes and lengths in tokens (25 tokens per second).

    The largest length bucket is also the window size for long clips (rounded down to whole
    semantic chunks for encoding). More buckets waste less padding but compile more programs.
    A batch holds at most `max_batch_tokens` tokens per device (but always one row), which bounds
    activation memory whatever the lengths: 32 short clips, or 4 windows of a long one.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_tokens: tuple[int, ...] = (32, 64, 128, 256, 512, 1008)
    max_batch_tokens: int = 4096

    def __post_init__(self):
        for name in ("batch_sizes", "num_tokens"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"Buckets.{name} must be increasing positive integers: {values}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"Buckets.max_batch_tokens must be positive: {self.max_batch_tokens}")

    def max_batch(self, tokens: int) -> int:
        """The largest batch bucket whose rows of `tokens` tokens fit the token budget."""
        fitting = [b for b in self.batch_sizes if b * tokens <= self.max_batch_tokens]
        return fitting[-1] if fitting else self.batch_sizes[0]

    @property
    def max_tokens(self) -> int:
        return self.num_tokens[-1]

    def batch_size(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def length(self, tokens: int) -> int:
        return next(t for t in self.num_tokens if t >= tokens)

    def encode_window(self, config: LosatokConfig) -> int:
        """Tokens per window of a long clip: whole semantic chunks, within the largest bucket."""
        chunk = config.semantic.chunk_tokens
        if self.max_tokens < chunk:
            raise ValueError(f"the largest length bucket ({self.max_tokens} tokens) must hold a "
                             f"semantic chunk ({chunk} tokens)")
        return self.max_tokens // chunk * chunk

    def decode_window(self, config: LosatokConfig) -> int:
        """Central tokens per window of a long latent sequence; a halo fills the rest."""
        central = self.max_tokens - 2 * decoder_halo(config)
        if central < 1:
            raise ValueError(f"the largest length bucket ({self.max_tokens} tokens) must exceed "
                             f"twice the decoder halo ({decoder_halo(config)} tokens)")
        return central


DEFAULT_BUCKETS = Buckets()


def decoder_halo(config: LosatokConfig) -> int:
    """Latents on each side that reach a decoded sample: the k=7 convs (embed + each ConvNeXt)
    see ±3 frames apiece, and the ISTFT spreads a frame over n_fft / hop frames of output."""
    frames = 3 * (config.decoder_depth + 1) + config.istft_n_fft // config.istft_hop
    return math.ceil(frames / config.upsample_tokens)


def row_samples(config: LosatokConfig, tokens: int) -> int:
    """Samples in a row of `tokens` tokens: room for any clip that has at most that many."""
    return config.samples_per_token * tokens + config.samples_per_token - config.hop_length - 1


def window_buffer(config: LosatokConfig, clip: np.ndarray, start_token: int,
                  window: int) -> np.ndarray:
    """The reflect-padded samples that `window` tokens from `start_token` read, plus the 3
    trailing frames a clip's last window may hold: (window_frames - 1) · hop + 2 · pad samples."""
    pad = config.front_end_pad
    begin = start_token * config.samples_per_token - pad
    length = (window_frames(config, window) - 1) * config.hop_length + 2 * pad
    index = np.abs(np.arange(begin, begin + length))
    last = len(clip) - 1
    index = np.where(index > last, 2 * last - index, index)
    return clip[np.clip(index, 0, last)]


def window_frames(config: LosatokConfig, window: int) -> int:
    return window * config.frames_per_token + config.frames_per_token - 1


@dataclasses.dataclass(frozen=True)
class Piece:
    """`count` outputs of clip `clip` from its token `start`. For decoding, the row holds the
    clip's latents [source, stop): the piece plus whatever halo exists on either side."""

    clip: int
    start: int
    count: int
    source: int = 0
    stop: int = 0


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
