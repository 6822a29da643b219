"""Extract LoSATok latents for many clips, exactly once, at any scale.

    python -m losatok_jax.extract --model_path ckpts/losatok_kl1e-2 --input data/ \
        --output_dir latents/ [--features z,mu] [--dtype bfloat16] [--compute_dtype bfloat16] \
        [--batch_size 8] [--format arrayrecord|npy]

INPUT is a folder (searched recursively for audio files) or a `.txt`/`.jsonl` manifest
(`_cli.list_inputs`). Output, in OUT (the layout and its exactly-once rules: `_shards`):
- `--format arrayrecord` (default): shards `latents-PPPPP-SSSSS.array_record` of process P, one
  record per clip (`losatok_jax.data.decode_record`); `--format npy`: `<id>.npy` and `<id>.json`
  per clip, mirroring the input tree, for trainers that read folders of arrays;
- `index.jsonl`: every clip (id, its file's absolute path, num_tokens, duration, where it is
  stored; and truncated_seconds for a file cut short, decoded up to where its data ends, with a
  warning);
- `stats.json`: per-channel count, mean and std of every stored feature over every stored token,
  exact whatever the kills, resumes and processes (`losatok_jax.stats`);
- `failures.jsonl`: inputs that could not be encoded in the latest run, with the reason;
- `extraction.json`: the settings that decide the stored values (format, features, storage and
  compute dtypes, sampling and its seed). A re-run into the same OUT must use the same ones, so
  one folder never mixes latents computed differently.
OUT may not be an input folder or lie inside one, nor be a folder holding files a manifest
lists. Everything is checked before OUT is created: a run refused at the start leaves nothing.
Progress is a line redrawn on a terminal, or a line every --log_interval seconds in a log; the
summary counts clips extracted, skipped as stored by an earlier run, and failed.

Multi-host: under `jax.distributed` (flags below, or auto-detected on TPU pods and SLURM), each
process takes a deterministic, disjoint share of the sorted inputs and encodes it on its own
devices; no process waits for another. Audio decoding runs in a pool of worker processes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterator

from losatok_jax import _cli, _files, _model_source, _shards
from losatok_jax._cli import Entry, list_inputs
from losatok_jax._shards import ExtractError
from losatok_jax.audio_io import (AudioReadError, TruncatedAudioWarning, read_audio,
                                  truncation_message)
from losatok_jax.config import SAMPLE_RATE
from losatok_jax.errors import require

def noise_id(clip_id: str) -> int:
    """A stable 31-bit key for a clip's sampling noise: independent of order and process."""
    return zlib.crc32(clip_id.encode()) & 0x7FFFFFFF


def _load(entry: Entry, min_samples: int, max_duration: float | None):
    """(audio_io.Audio, None) or (None, reason): decoding problems are data, not crashes."""
    try:
        audio = read_audio(entry.path, SAMPLE_RATE, max_duration=max_duration)
    except AudioReadError as e:
        return None, str(e)
    if len(audio.samples) < min_samples:
        return None, (f"too short: {len(audio.samples)} samples, the model needs at least "
                      f"{min_samples} ({1000 * min_samples / SAMPLE_RATE:.0f} ms)")
    return audio, None


def _prefetched(entries: list[Entry], workers: int, *load_args) -> Iterator[tuple]:
    """(entry, audio, reason) in input order, decoded by `workers` processes a bounded way ahead.

    Processes, not threads: some decoders (AAC, with its small frames) hold the GIL for much
    of their time, so threads do not scale with the host's cores, and the main process needs
    its own core for batching and writing.
    The workers start from a fresh interpreter (forkserver), never as forks of this process,
    whose JAX runtime holds threads a fork would not carry."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once, by the server, not per worker
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        ahead: collections.deque = collections.deque()
        for entry in entries:
            ahead.append((entry, pool.submit(_load, entry, *load_args)))
            if len(ahead) >= 4 * workers:
                entry, future = ahead.popleft()
                yield (entry, *future.result())
        for entry, future in ahead:
            yield (entry, *future.result())


class Progress:
    """Clips, audio hours and audio hours per second, on a status line (`_cli.StatusLine`)."""

    def __init__(self, total: int, skipped: int, log_interval: float):
        self.total, self.done, self.failed, self.hours = total, 0, 0, 0.0
        self.skipped = skipped  # stored by an earlier run
        self.line = _cli.StatusLine(log_interval=log_interval)

    def rate(self) -> float:
        return self.hours / max(time.perf_counter() - self.line.start, 1e-9)

    def show(self):
        self.line.show(f"{self.done + self.failed}/{self.total} clips, {self.hours:.3f} h of "
                       f"audio, {self.rate():.4f} h/s, {self.failed} failed")

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.line.start
        return (f"done: {self.done} clips extracted, {self.skipped} skipped as already stored, "
                f"{self.failed} failed; {self.hours:.3f} h of audio in {elapsed:.1f} s "
                f"({self.rate():.4f} h/s)")


def _initialize_distributed(args) -> tuple[int, int]:
    """(process index, process count), starting jax.distributed when asked or detected. Given
    --num_processes and --process_id without a coordinator, the processes are independent (no
    jax.distributed): several on one host, each over some of its chips, share the inputs so."""
    import jax

    explicit = args.coordinator_address is not None
    detected = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
        "TPU_WORKER_HOSTNAMES", "")
    if (args.num_processes is None) != (args.process_id is None):
        raise ExtractError("--num_processes and --process_id go together")
    if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
        raise ExtractError(f"--process_id {args.process_id} is not in 0..{args.num_processes - 1}")
    if explicit:
        if args.num_processes is None:
            raise ExtractError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.num_processes is not None:
        return args.process_id, args.num_processes
    elif detected:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def _check_outputs(args, entries: list[Entry]) -> None:
    """The output folder can be written and is no input, nor inside one (checked without
    creating anything)."""
    listed = [] if Path(args.input).is_dir() else [entry.path for entry in entries]
    _files.check_apart(args.output_dir, "--output_dir",
                       [("--input", args.input), ("--model_path", args.model_path)], listed)
    _files.check_writable_folder(args.output_dir)


def run(args) -> Progress:
    import jax

    from losatok_jax import _execution, compilation
    from losatok_jax._batching import batch_plan_buckets, extraction_buckets, read_batch_plan
    from losatok_jax.api import load_losatok
    from losatok_jax.model import FEATURE_KEYS
    from losatok_jax.runners import MeshRunner, Runner

    features = tuple(args.features.split(","))
    unknown = sorted(set(features) - set(FEATURE_KEYS))
    if unknown:
        raise ExtractError(f"--features: unknown {unknown}; choose from {', '.join(FEATURE_KEYS)}")
    if args.format == "npy" and len(features) != 1:
        raise ExtractError(f"--format npy writes one feature per clip (<id>.npy); got --features "
                           f"{','.join(features)}")
    if args.format == "npy" and args.dtype == "bfloat16":
        raise ExtractError("--format npy stores float32 or float16: .npy files have no bfloat16 "
                           "(use the arrayrecord format for bfloat16)")
    if args.batch_plan is not None and (args.batch_size or args.buckets):
        raise ExtractError("--batch_plan sets the length buckets and their batches: leave out "
                           "--batch_size and --buckets")
    if args.format == "arrayrecord":
        require("array_record.python.array_record_module", "data", "--format arrayrecord")
        require("msgpack", "data", "--format arrayrecord")
    # Inputs, then outputs, then the settings an earlier run recorded: nothing is written
    # until the model is loaded.
    entries = list_inputs(args.input)
    _model_source.check_exists(args.model_path)
    batch_plan = None if args.batch_plan is None else read_batch_plan(args.batch_plan,
                                                                      args.compute_dtype)
    _check_outputs(args, entries)
    out = Path(args.output_dir)
    settings = {"format": args.format, "features": list(features), "dtype": args.dtype,
                "compute_dtype": args.compute_dtype, "sample": args.sample,
                "seed": args.seed if args.sample else None}
    _shards.check_settings(out, settings)
    process, processes = _initialize_distributed(args)
    compilation.enable_compilation_cache(args.compilation_cache_dir)
    model_path, config_path = _model_source.resolve(args.model_path, args.config_path)
    model = load_losatok(model_path, config_path=config_path, dtype=args.compute_dtype)
    runner = MeshRunner(model) if jax.local_device_count() > 1 else Runner(model)
    if args.batch_plan is None:
        buckets = extraction_buckets(args.batch_size or 8, args.buckets)
    else:
        buckets = batch_plan_buckets(batch_plan, args.batch_plan, model.config)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _files.OutputError(f"cannot create {out}: {e.strerror}") from None
    _shards.record_settings(out, settings)
    _shards.clean_up(out, process)
    done = _shards.completed_ids(out)
    share = [e for i, e in enumerate(entries) if i % processes == process]
    pending = [e for e in share if e.id not in done]
    progress = Progress(len(pending), len(share) - len(pending), args.log_interval)
    writer = _shards.GroupWriter(out, process, args.shard_size, args.format, args.dtype)
    failures_path = out / f"failures-{process:05d}.jsonl"
    rng = jax.random.key(args.seed)
    group_size = buckets.batch_sizes[-1] * runner.num_devices * 4

    def write_group(members, latents):
        for (entry, audio), clip in zip(members, latents):
            duration = len(audio.samples) / SAMPLE_RATE
            row = {"id": entry.id, "path": os.path.abspath(entry.path),
                   "duration": duration, "sample_rate": SAMPLE_RATE}
            if audio.missing_seconds:
                row["truncated_seconds"] = round(audio.missing_seconds, 6)
            writer.write(row, clip)
            progress.done += 1
            progress.hours += duration / 3600
        progress.show()

    # Records and statistics are written on their own thread, one group behind the encoding,
    # so the main thread goes on cutting and starting batches; only that thread touches `writer`.
    with open(failures_path, "w") as failures, \
            concurrent.futures.ThreadPoolExecutor(1, "records") as records:
        group: list[tuple[Entry, object]] = []
        writing = None  # the previous group's records

        def flush(wait: bool = False):
            nonlocal writing
            if group:
                # Straight to the batch plan: `read_audio` has already refused NaN and Inf, and
                # `_load` clips too short, so `encode`'s second pass over every sample is spared.
                latents = _execution.encode_clips(
                    runner, [audio.samples for _, audio in group], rng if args.sample else None,
                    buckets, features, [noise_id(entry.id) for entry, _ in group])
                if writing is not None:
                    writing.result()
                writing = records.submit(write_group, list(group), latents)
                group.clear()
            if wait and writing is not None:
                writing.result()
                writing = None

        for entry, audio, reason in _prefetched(pending, args.num_workers,
                                                model.config.min_samples, args.max_duration):
            if reason is None and audio.missing_seconds:
                message = truncation_message(entry.path, audio, SAMPLE_RATE)
                if args.strict:
                    reason = message
                else:
                    warnings.warn(message, TruncatedAudioWarning, stacklevel=1)
            if reason is not None:
                if args.strict:
                    flush(wait=True)
                    writer.close()
                    raise ExtractError(f"{reason} (--strict)" if reason.startswith(entry.path)
                                       else f"{entry.path}: {reason} (--strict)")
                failures.write(json.dumps({"id": entry.id, "path": os.path.abspath(entry.path),
                                           "reason": reason}) + "\n")
                failures.flush()
                progress.failed += 1
                continue
            group.append((entry, audio))
            if len(group) >= group_size:
                flush()
        flush(wait=True)
    writer.close()
    _shards.merge(out)
    progress.line.end()
    return progress


def _parser() -> argparse.ArgumentParser:
    from losatok_jax._batching import DEFAULT_BUCKETS
    from losatok_jax.data import STORAGE_DTYPES
    from losatok_jax.model import COMPUTE_DTYPES

    count = _cli.positive(int, "whole number")
    parser = _cli.Parser("extract", __doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help=_model_source.MODEL_HELP)
    parser.add_argument("--config_path", default=None, help=_model_source.CONFIG_HELP)
    parser.add_argument("--input", required=True, help="folder, .txt or .jsonl manifest")
    parser.add_argument("--output_dir", required=True,
                        help="where shards and indexes go (not inside an input folder)")
    parser.add_argument("--features", default="z", help="comma-separated features to store")
    parser.add_argument("--dtype", default="float32", choices=tuple(STORAGE_DTYPES),
                        help="storage dtype of the features")
    parser.add_argument("--format", default="arrayrecord", choices=_shards.FORMATS,
                        help="arrayrecord: shards of records; npy: <id>.npy (one feature) and "
                             "<id>.json per clip, mirroring the input tree")
    parser.add_argument("--compute_dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="dtype the model computes in: float32 is the exact port; bfloat16 "
                             "runs its matmuls in bf16 (fast on GPU and TPU)")
    parser.add_argument("--batch_size", type=count, default=None,
                        help="clips per device per batch (default 8)")
    parser.add_argument("--buckets", type=_cli.positive_list, default=None,
                        help="length buckets in tokens (25 per second); encoding uses those "
                             "below one semantic chunk (252) and the chunk (default "
                             f"{','.join(map(str, DEFAULT_BUCKETS.num_tokens))})")
    parser.add_argument("--batch_plan", default=None,
                        help="a batch plan written by python -m losatok_jax.plan --batch_plan: "
                             "the largest batch per length bucket that fits the accelerator")
    parser.add_argument("--sample", action="store_true", help="store sampled z, not z = mu")
    parser.add_argument("--seed", type=_cli.seed, default=0, help="seed for --sample")
    parser.add_argument("--shard_size", type=count, default=1000, help="records per shard")
    parser.add_argument("--num_workers", type=count, default=len(os.sched_getaffinity(0)),
                        help="worker processes decoding and resampling audio (default: one "
                             "per core)")
    parser.add_argument("--max_duration", type=_cli.positive(float, "number of seconds"),
                        default=None, help="use only the first S seconds of each clip")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad input, a truncated file included")
    parser.add_argument("--log_interval", type=_cli.positive(float, "number of seconds"),
                        default=10.0, help="off a terminal (a log file), write a progress line "
                                           "at most every S seconds (default 10)")
    parser.add_argument("--compilation_cache_dir", default=None,
                        help="persistent JAX compilation cache")
    parser.add_argument("--coordinator_address", default=None, help="jax.distributed HOST:PORT")
    parser.add_argument("--num_processes", type=count, default=None,
                        help="processes sharing the inputs (without --coordinator_address: "
                             "independent ones, e.g. several per host)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index")
    return parser


def _run(args: argparse.Namespace) -> None:
    print(run(args).summary())


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
