"""Host-side planning: which padded shapes the jitted entry points see, and where clips go.

Every call is cut into *pieces* placed in rows of a few fixed shapes (batch and length buckets), so
compilation is bounded however varied the inputs are, and padding is small:
- encoding: a row holds at most one semantic chunk (the encoder attends within a chunk only and
  the acoustic path is frame-local), so a clip is cut into chunk windows, each with the clip's own
  samples around it; its last window takes the shortest bucket that holds it. A clip of several
  windows first gets a cheap pass that finds its spectrogram peak for the 120 dB floor;
- decoding: windows with a halo of latents on both sides covering the decoder's receptive field,
  of the length that computes the fewest padded tokens, the last one again in the shortest
  bucket that holds it. Windows are then packed several to a row, a few masked latents apart
  (the decoder is local and zeroes masked frames before every convolution), so that short clips
  fill the padding that long ones leave;
- batches: rows of one length are grouped into batch buckets largest first (5 rows run as 4 + 1,
  not as 8 with 3 rows of filler).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterator, Sequence

import numpy as np

from losatok_jax import _files
from losatok_jax.config import LosatokConfig
from losatok_jax.errors import LosatokError


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes compiled: batch sizes and lengths in tokens (25 tokens per second).

    The default lengths step by about 1.25 (a row is padded by at most a quarter, 11% on average)
    and include whole seconds (25, 50, 100, 200 tokens) and the semantic chunk (252) with its
    multiples up to 1512 (60 s decodes in one window). Encoding uses the lengths below one
    semantic chunk plus the chunk itself; decoding uses them all, the largest bounding its windows
    on long sequences. A batch holds at most `max_batch_tokens` tokens per device (but always one
    row), which bounds activation memory whatever the lengths: 32 short clips, or 2 windows of a
    long one.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_tokens: tuple[int, ...] = (16, 25, 32, 40, 50, 64, 80, 100, 126, 160, 200, 252, 320, 400,
                                   504, 640, 756, 800, 1008, 1260, 1512)
    max_batch_tokens: int = 4096
    # (row length, batch) pairs from a batch plan: these lengths run at most that batch, in
    # place of the token budget's.
    fixed_batches: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        for name in ("batch_sizes", "num_tokens"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise LosatokError(f"Buckets.{name} must be increasing positive integers: {values}")
        if self.max_batch_tokens < 1:
            raise LosatokError(f"Buckets.max_batch_tokens must be positive: {self.max_batch_tokens}")

    def max_batch(self, tokens: int) -> int:
        """The largest batch bucket whose rows of `tokens` tokens fit the token budget (or the
        batch plan's batch for that length)."""
        fixed = dict(self.fixed_batches).get(tokens)
        fitting = [b for b in self.batch_sizes if (b <= fixed if fixed is not None
                                                   else b * tokens <= self.max_batch_tokens)]
        return fitting[-1] if fitting else self.batch_sizes[0]

    @property
    def max_tokens(self) -> int:
        return self.num_tokens[-1]

    def length(self, tokens: int) -> int:
        return next(t for t in self.num_tokens if t >= tokens)

    def encode_lengths(self, config: LosatokConfig) -> tuple[int, ...]:
        """Row lengths for encoding: the buckets shorter than a semantic chunk, and the chunk."""
        chunk = config.semantic.chunk_tokens
        return tuple(t for t in self.num_tokens if t < chunk) + (chunk,)

    def encode_length(self, config: LosatokConfig, tokens: int) -> int:
        return next(t for t in self.encode_lengths(config) if t >= tokens)

    def batch_groups(self, items: Sequence, tokens: int, num_devices: int = 1) -> Iterator[
            tuple[Sequence, int]]:
        """(items, batch size) groups of rows of `tokens` tokens: the largest batch bucket that
        the remaining rows fill and the token budget allows, so only the last group can hold
        filler (when no bucket matches what is left). Sizes count rows over `num_devices`."""
        sizes = [b for b in self.batch_sizes if b <= self.max_batch(tokens)]
        start = 0
        while start < len(items):
            left = len(items) - start
            full = [b for b in sizes if b * num_devices <= left]
            size = (full[-1] if full else next((b for b in sizes if b * num_devices >= left),
                                                sizes[-1])) * num_devices
            yield items[start:start + size], size
            start += size


DEFAULT_BUCKETS = Buckets()
POWERS_OF_TWO = tuple(2 ** i for i in range(11))  # the batch buckets extraction may use


def _batch_sizes_up_to(batch_size: int) -> tuple[int, ...]:
    """Powers of two below `batch_size`, then `batch_size`."""
    return tuple(b for b in POWERS_OF_TWO if b < batch_size) + (batch_size,)


def extraction_buckets(batch_size: int, num_tokens=None) -> Buckets:
    """The buckets `extract --batch_size B [--buckets ...]` runs: powers of two up to B."""
    return Buckets(batch_sizes=_batch_sizes_up_to(batch_size),
                   num_tokens=tuple(num_tokens or DEFAULT_BUCKETS.num_tokens))


BATCH_PLAN_FORMAT = "losatok-batch-plan"


class BatchPlanError(LosatokError):
    """A batch plan file that cannot be read, or was made for another model or dtype."""


def write_batch_plan(path: str, batches: dict[int, int], *, config: LosatokConfig, dtype: str,
                     target: str, hbm_fraction: float) -> None:
    """Writes the largest batch per encode row length that fits a target's HBM budget."""
    plan = {"format": BATCH_PLAN_FORMAT, "target": target, "dtype": dtype,
            "hbm_fraction": hbm_fraction, "config": config.to_dict(),
            "encode_batches": {str(tokens): batch for tokens, batch in sorted(batches.items())}}
    _files.write_atomically(path, json.dumps(plan, indent=1) + "\n")


def read_batch_plan(path: str, dtype: str) -> dict:
    """A batch plan file's contents, checked to be one made for computing in `dtype`, its
    batches keyed by row length."""
    not_one = BatchPlanError(f"--batch_plan {path}: not a batch plan (write one with "
                             "python -m losatok_jax.plan --batch_plan)")
    try:
        with open(path) as f:
            plan = json.load(f)
        batches = {int(tokens): batch for tokens, batch in plan["encode_batches"].items()}
        fine = (plan["format"] == BATCH_PLAN_FORMAT and isinstance(plan["dtype"], str)
                and isinstance(plan["config"], dict) and batches and all(
                    isinstance(b, int) and b >= 1 and t >= 1 for t, b in batches.items()))
    except OSError as e:
        raise BatchPlanError(f"--batch_plan {path}: cannot read it: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise not_one from None
    if not fine:
        raise not_one
    if plan["dtype"] != dtype:
        raise BatchPlanError(f"--batch_plan {path} was planned for --compute_dtype "
                             f"{plan['dtype']}, not {dtype}")
    return {**plan, "encode_batches": batches}


def batch_plan_buckets(plan: dict, path: str, config: LosatokConfig) -> Buckets:
    """The encode buckets of a batch plan (`read_batch_plan`) for `config`: its row lengths,
    each at its planned batch."""
    if plan["config"] != json.loads(json.dumps(config.to_dict())):
        raise BatchPlanError(f"--batch_plan {path} was planned for another model config")
    batches = plan["encode_batches"]
    sizes = set(_batch_sizes_up_to(max(batches.values()))) | set(batches.values())
    return Buckets(batch_sizes=tuple(sorted(sizes)), num_tokens=tuple(sorted(batches)),
                   fixed_batches=tuple(sorted(batches.items())))


# Frames a k=7 decoder convolution (the embedding conv, each ConvNeXt dwconv) reads either side.
DECODER_CONV_REACH = 7 // 2


def decoder_halo(config: LosatokConfig) -> int:
    """Latents on each side that reach a decoded sample: the embed and each ConvNeXt conv see
    `DECODER_CONV_REACH` frames apiece, and the ISTFT spreads a frame over n_fft / hop frames."""
    frames = (DECODER_CONV_REACH * (config.decoder_depth + 1)
              + config.istft_n_fft // config.istft_hop)
    return math.ceil(frames / config.upsample_tokens)


def window_buffer(config: LosatokConfig, clip: np.ndarray, start_token: int, window: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The reflect-padded samples that `window` tokens from `start_token` read, plus the 3
    trailing frames a clip's last window may hold: (window_frames - 1) · hop + 2 · pad samples,
    written into `out` if given.

    Samples inside the clip are one copy; only those before its start or past its end go through
    the reflection (mirrored without the edge sample, and held at the first sample where even
    the mirror runs out): cutting windows is on the host's path for every clip extracted."""
    begin = start_token * config.samples_per_token - config.front_end_pad
    length = window_samples(config, window)
    if out is None:
        out = np.empty(length, clip.dtype)
    inside = slice(min(max(begin, 0), len(clip)), max(min(begin + length, len(clip)), 0))
    out[inside.start - begin:inside.stop - begin] = clip[inside]
    outside = np.r_[begin:min(inside.start, begin + length), max(inside.stop, begin):begin + length]
    if len(outside):
        last = len(clip) - 1
        index = np.abs(outside)
        index = np.where(index > last, 2 * last - index, index)
        out[outside - begin] = clip[np.clip(index, 0, last)]
    return out


def window_frames(config: LosatokConfig, window: int) -> int:
    return window * config.frames_per_token + config.frames_per_token - 1


def window_samples(config: LosatokConfig, window: int) -> int:
    return (window_frames(config, window) - 1) * config.hop_length + 2 * config.front_end_pad


@dataclasses.dataclass(frozen=True)
class Piece:
    """`count` outputs of clip `clip` from its token `start`. For decoding, the row holds the
    clip's latents [source, stop): the piece plus whatever halo exists on either side."""

    clip: int
    start: int
    count: int
    source: int = 0
    stop: int = 0


def encode_pieces(config: LosatokConfig, clip: int, tokens: int) -> list[Piece]:
    """A clip of `tokens` tokens as consecutive semantic-chunk windows (the last may be short)."""
    chunk = config.semantic.chunk_tokens
    return [Piece(clip, start, min(chunk, tokens - start)) for start in range(0, tokens, chunk)]


def decode_pieces(config: LosatokConfig, buckets: Buckets, clip: int, tokens: int) -> list[Piece]:
    """A latent sequence as windows of at most the largest bucket, halo included: each window
    outputs the tokens whose receptive field it holds whole.

    All windows but the last fill one length bucket and the last holds just the rest in the
    shortest bucket that fits; the length is the one that computes the fewest padded tokens
    (the longer on a tie). 100 s at full size runs as 1260 + 1260 + 80 tokens, where filling the
    largest bucket would run 1512 + 1260.
    """
    halo, longest = decoder_halo(config), buckets.max_tokens
    if longest <= 2 * halo:
        raise LosatokError(f"the largest length bucket ({longest} tokens) must exceed twice the "
                         f"decoder halo ({halo} tokens)")
    plans = [_windows(clip, tokens, window, halo) for window in buckets.num_tokens
             if window > 2 * halo]
    return min(reversed(plans),
               key=lambda plan: sum(buckets.length(p.stop - p.source) for p in plan))


def _windows(clip: int, tokens: int, window: int, halo: int) -> list[Piece]:
    """Windows of `window` tokens (halo included) over a sequence, the last holding the rest."""
    pieces, start = [], 0
    while True:
        source = max(0, start - halo)
        if tokens - source <= window:
            return pieces + [Piece(clip, start, tokens - start, source, tokens)]
        stop = source + window
        pieces.append(Piece(clip, start, stop - halo - start, source, stop))
        start = stop - halo


def decoder_gap(config: LosatokConfig) -> int:
    """Masked latents between two windows packed into one row, so that neither reaches the other:
    a conv reads `DECODER_CONV_REACH` frames past a window's edge (frames `keep` zeroes before
    every conv), and the ISTFT spreads a frame (n_fft - hop) / 2 samples past its own hop."""
    spill = math.ceil((config.istft_n_fft - config.istft_hop) / 2 / config.istft_hop)
    return math.ceil(max(DECODER_CONV_REACH, spill) / config.upsample_tokens)


@dataclasses.dataclass(frozen=True)
class Row:
    """One decode row of `length` (a bucket) tokens holding `pieces`: (piece, offset), its latents
    [source, stop) at row positions [offset, offset + stop - source); the rest is masked."""

    length: int
    pieces: tuple[tuple[Piece, int], ...]


def pack_decode_rows(config: LosatokConfig, buckets: Buckets, pieces: Sequence[Piece]) -> list[Row]:
    """Decode windows packed into rows, `decoder_gap` latents apart, so that few tokens are padding.

    Longest first, each window goes where it adds the fewest computed tokens: into a row whose
    bucket still has room (none), into a row that then takes a longer bucket (the difference), or
    into a row of its own (its bucket), the last on a tie and the oldest row among equal rows.
    Eight clips of 1-12 s compute 1212 tokens for 1171 this way, where a row per window computes
    1316 (`tests/test_batching.py`).
    """
    gap, longest = decoder_gap(config), buckets.max_tokens
    fills: list[int] = []  # tokens used in each row, gaps included
    members: list[list[tuple[Piece, int]]] = []
    rows_by_fill: dict[int, list[int]] = {}  # rows with room for more, oldest first: few fills
    for piece in sorted(pieces, key=lambda p: p.stop - p.source, reverse=True):
        need = piece.stop - piece.source
        own_row = buckets.length(need)
        added, best = min(((buckets.length(fill + gap + need) - buckets.length(fill), rows[0])
                           for fill, rows in rows_by_fill.items()
                           if fill + gap + need <= longest), default=(own_row, None))
        if best is None or added >= own_row:
            best = len(fills)
            fills.append(0)
            members.append([])
            offset = 0
        else:
            rows_by_fill[fills[best]].remove(best)
            if not rows_by_fill[fills[best]]:
                del rows_by_fill[fills[best]]
            offset = fills[best] + gap
        members[best].append((piece, offset))
        fills[best] = offset + need
        if fills[best] + gap < longest:
            rows_by_fill.setdefault(fills[best], []).append(best)
    return [Row(buckets.length(fill), tuple(row)) for fill, row in zip(fills, members)]


def plan_decode_rows(config: LosatokConfig, buckets: Buckets,
                     lengths: Sequence[int]) -> list[Row]:
    """The rows that decode clips of `lengths` latents: every clip's windows, packed."""
    pieces = [p for i, n in enumerate(lengths) for p in decode_pieces(config, buckets, i, n)]
    return pack_decode_rows(config, buckets, pieces)
