"""Running batch plans: clips and latent sequences of any lengths, cut into pieces
(`_batching`), batched into bucketed rows, run by a `Runner`, and put back together per clip.

`warmup` compiles ahead of time exactly what a runner will run for a set of buckets.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax import _batching, _programs
from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax.config import LosatokConfig
from losatok_jax.model import FEATURE_KEYS
from losatok_jax.runners import Runner


def encode_clips(runner: Runner, clips: list[np.ndarray], rng, buckets: Buckets,
                 keys: tuple[str, ...], noise_ids: Sequence[int],
                 progress: Progress | None = None) -> list[dict[str, np.ndarray]]:
    """Encodes 1-D clips of any lengths; returns per clip the `keys` features, each (T_i, dim).

    Every clip is cut into semantic-chunk windows (`_batching.encode_pieces`); a window's row is
    the shortest encode length that holds it. Clips of several windows get their spectrogram
    peak from a first pass over their windows, so the 120 dB floor follows the whole clip. Each
    batch is started before the previous one's results are fetched, so cutting windows overlaps
    the devices' work; batches of one shape take turns with two buffers (`_RowBuffers`).
    `progress("encoding", done, total)` is called after each batch.
    """
    c = runner.model.config
    tokens = [c.num_tokens(len(clip)) for clip in clips]
    pieces = [p for i in range(len(clips)) for p in _batching.encode_pieces(c, i, tokens[i])]
    peaks = np.full(len(clips), -np.inf, np.float32)  # -inf: the window's own peak is the clip's
    several = [p for p in pieces if tokens[p.clip] > p.count]
    chunk = c.semantic.chunk_tokens
    peak_batches = list(buckets.batch_groups(several, chunk, runner.num_devices))
    batches = [(length, group, size)
               for length, members in _by_length(pieces, lambda p: buckets.encode_length(c, p.count))
               for group, size in buckets.batch_groups(members, length, runner.num_devices)]
    report = _Report(progress, "encoding", len(peak_batches) + len(batches))
    rows = _RowBuffers()
    for group, size in peak_batches:
        buffers, valid = _window_rows(c, clips, group, chunk, rows.take(size, chunk, c))
        window_peak = runner.window_peaks(buffers, valid)
        for r, p in enumerate(group):
            peaks[p.clip] = max(peaks[p.clip], window_peak[r])
        report.batch_done()
    outputs = _Outputs(tokens)

    def place(group, running):
        out = runner.to_host(running)
        for r, p in enumerate(group):
            outputs.place(p.clip, p.start, {k: out[k][r, :p.count] for k in keys})
        report.batch_done()

    running = None  # the batch on the devices while the next one is cut and started
    for length, group, size in batches:
        buffers, valid = _window_rows(c, clips, group, length, rows.take(size, length, c))
        filler = [0] * (size - len(group))
        clip_peaks = np.array([peaks[p.clip] for p in group] + filler, np.float32)
        starts = np.array([p.start for p in group] + filler, np.int32)
        ids = _padded_ids(noise_ids, [p.clip for p in group], size)
        started = (group, runner.encode_windows(rng, buffers, valid, clip_peaks, ids, starts,
                                                keys))
        if running is not None:
            place(*running)
        running = started
    if running is not None:
        place(*running)
    return outputs.arrays


# progress(stage, batches done, batches in all): how long-running calls report how far they are.
Progress = Callable[[str, int, int], None]


class _Report:
    def __init__(self, progress: Progress | None, stage: str, total: int):
        self.progress, self.stage, self.total, self.done = progress, stage, total, 0

    def batch_done(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)


def _by_length(pieces, row_length) -> list[tuple[int, list]]:
    """Pieces grouped by the row length each needs, shortest first."""
    groups: dict[int, list] = {}
    for p in pieces:
        groups.setdefault(row_length(p), []).append(p)
    return sorted(groups.items())


class _RowBuffers:
    """Host buffers for consecutive batches of one shape, two used in turn. Writing a fresh
    buffer of many megabytes costs the host a page fault per page touched, about as much as
    cutting the windows into it; a buffer is reused two batches later, when the batch that used
    it has had its results fetched, so the devices are done reading it. A batch of another shape
    starts a new pair (batches come grouped by length), so at most two are held."""

    def __init__(self):
        self._shape, self._pair = None, []

    def take(self, size: int, window: int, config: LosatokConfig) -> np.ndarray:
        shape = (size, _batching.window_samples(config, window))
        if shape != self._shape:
            self._shape, self._pair = shape, []
        if len(self._pair) < 2:
            self._pair.append(np.empty(shape, np.float32))
        else:
            self._pair.reverse()  # the buffer used before the last one
        return self._pair[-1]


def _window_rows(config: LosatokConfig, clips, group, window: int, buffers: np.ndarray):
    """Fills `buffers` (a batch of `window`-token rows) with the pieces in `group`, the rows
    after them with zeros (filler); returns it and each row's count of real frames."""
    size = len(buffers)
    frames = _batching.window_frames(config, window)
    buffers[len(group):] = 0
    valid = np.full(size, frames, np.int32)
    for r, p in enumerate(group):
        _batching.window_buffer(config, clips[p.clip], p.start, window, out=buffers[r])
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


def decode_latents(runner: Runner, latents: list[np.ndarray], buckets: Buckets,
                   progress: Progress | None = None) -> list[np.ndarray]:
    """Decodes (T_i, D) latent sequences of any lengths; returns (640 · T_i,) audio each.
    `progress("decoding", done, total)` is called after each batch."""
    c = runner.model.config
    hop = c.samples_per_token
    outputs = _Outputs([len(z) * hop for z in latents])
    packed = _batching.plan_decode_rows(c, buckets, [len(z) for z in latents])
    batches = [(length, group, size) for length, members in _by_length(packed, lambda r: r.length)
               for group, size in buckets.batch_groups(members, length, runner.num_devices)]
    report = _Report(progress, "decoding", len(batches))
    for length, group, size in batches:
        rows = np.zeros((size, length, c.decoder_dim), np.float32)
        token_mask = np.zeros((size, length), bool)
        for r, row in enumerate(group):
            for p, offset in row.pieces:
                span = slice(offset, offset + p.stop - p.source)
                rows[r, span] = latents[p.clip][p.source:p.stop]
                token_mask[r, span] = True
        audio = runner.decode_rows(rows, token_mask)
        for r, row in enumerate(group):
            for p, offset in row.pieces:
                begin = (offset + p.start - p.source) * hop
                outputs.place(p.clip, p.start * hop, audio[r, begin:begin + p.count * hop])
        report.batch_done()
    return outputs.arrays


def warmup(runner: Runner, buckets: Buckets = DEFAULT_BUCKETS, *, sample: bool = False,
           keys: Sequence[str] = FEATURE_KEYS, decode_too: bool = True) -> int:
    """Compiles, without running, every program `runner` runs for plans within `buckets`: the same
    stages with the same shapes and placement, lowered from shapes alone. Returns their number."""
    programs = lower_programs(runner, buckets, sample=sample, keys=keys, decode_too=decode_too)
    return len([runner.compile(program) for program in programs])


def lower_programs(runner: Runner, buckets: Buckets = DEFAULT_BUCKETS, *, sample: bool = False,
                   keys: Sequence[str] = FEATURE_KEYS, decode_too: bool = True) -> list:
    """Every program `runner` runs for plans within `buckets`, lowered (`jax.stages.Lowered`)
    from shapes alone. The runner's parameters may be abstract."""
    return [program.lowered for program in program_plan(runner, buckets, sample=sample,
                                                        keys=keys, decode_too=decode_too)]


class PlannedProgram(NamedTuple):
    """One program of a plan: the operation and row length (tokens) it serves, its batch bucket
    (rows per device), its stage, and the stage lowered."""

    operation: str  # "encode" or "decode"
    tokens: int
    batch: int
    stage: str  # "peaks", "stem", "stack" or "finish"
    lowered: jax.stages.Lowered


def program_plan(runner: Runner, buckets: Buckets = DEFAULT_BUCKETS, *, sample: bool = False,
                 keys: Sequence[str] = FEATURE_KEYS, decode_too: bool = True,
                 encode_too: bool = True, largest_batch_only: bool = False):
    """Yields every program `runner` runs for plans within `buckets`, each stage lowered from
    the outputs of the stage before, as `encode_clips` and `decode_latents` chain them
    (`encode_too`, `decode_too`: which of the two); with `largest_batch_only`, only each
    length's largest batch bucket (what full batches run)."""
    c = runner.model.config
    rng = jax.random.key(0) if sample else None
    chunk = c.semantic.chunk_tokens
    for b in buckets.batch_sizes:
        rows = b * runner.num_devices  # a batch bucket counts rows per device

        def batch(*shape, dtype=jnp.float32):
            return runner.batch_spec((rows, *shape), dtype)

        def runs(tokens: int) -> bool:
            largest = buckets.max_batch(tokens)
            return b == largest if largest_batch_only else b <= largest

        ints, floats = batch(dtype=jnp.int32), batch()
        if encode_too and runs(chunk):
            yield PlannedProgram("encode", chunk, b, "peaks", runner.lower(
                _programs.window_peaks, (), (batch(_batching.window_samples(c, chunk)), ints)))
        for k in (k for k in buckets.encode_lengths(c) if encode_too and runs(k)):
            stem = runner.lower(_programs.encode_stem, (),
                                (batch(_batching.window_samples(c, k)), ints, floats))
            features = runner.outputs(stem)
            stack = runner.lower_stack("semantic", features["chunks"], features["chunk_mask"])
            finish = runner.lower(_programs.encode_finish, (rng,),
                                  (features, runner.outputs(stack), ints, ints), keys=tuple(keys))
            for stage, lowered in (("stem", stem), ("stack", stack), ("finish", finish)):
                yield PlannedProgram("encode", k, b, stage, lowered)
        for k in (k for k in buckets.num_tokens if decode_too and runs(k)):
            stem = runner.lower(_programs.decode_stem, (),
                                (batch(k, c.decoder_dim), batch(k, dtype=jnp.bool_)))
            x, keep = runner.outputs(stem)
            stack = runner.lower_stack("decoder", x, keep)
            finish = runner.lower(_programs.decode_finish, (), (runner.outputs(stack), keep))
            for stage, lowered in (("stem", stem), ("stack", stack), ("finish", finish)):
                yield PlannedProgram("decode", k, b, stage, lowered)
