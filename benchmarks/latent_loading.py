"""Data loading for training on latents: throughput of `losatok_jax.data.latent_dataset` (crop/pad
and packed batches) on synthetic records, and packing efficiency on realistic clip lengths.

    python -m benchmarks.latent_loading                    # 10k records, 1-30 s clips
    python -m benchmarks.latent_loading --records 1000 --output results.json

The records are written the way `losatok_jax.extract` writes them (ArrayRecord shards of bfloat16
latents, 128 channels at 25 per second, with their stats.json), once, under the work directory.
Throughput is one Python process, one thread, reading through Grain's data source as a trainer's
input pipeline would (before any multiprocessing Grain adds). Packing efficiency is real tokens
over row tokens for each length distribution, row length and number of packing bins; it needs no
data on disk beyond the lengths, but is measured through the same pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import _cpu_model
from losatok_jax import _shards, data

WIDTH = 128
TOKENS_PER_SECOND = 25


def clip_tokens(count: int, distribution: str, seed: int = 0) -> np.ndarray:
    """Clip lengths in tokens for 1-30 s clips: uniform in seconds, or log-uniform (many short
    clips, as in speech corpora)."""
    rng = np.random.default_rng(seed)
    seconds = (rng.uniform(1, 30, count) if distribution == "uniform"
               else np.exp(rng.uniform(np.log(1), np.log(30), count)))
    return np.maximum(1, np.round(seconds * TOKENS_PER_SECOND)).astype(int)


def write_extraction(directory: Path, lengths: np.ndarray, width: int = WIDTH) -> Path:
    if (directory / "stats.json").exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    _shards.check_settings(directory, {"format": "arrayrecord", "features": ["z"],
                                       "dtype": "bfloat16", "compute_dtype": "float32",
                                       "sample": False, "seed": None})
    writer = _shards.GroupWriter(directory, 0, 1000, "arrayrecord", "bfloat16")
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        writer.write({"id": f"clip{i:06d}", "path": f"clip{i:06d}.wav",
                      "duration": n / TOKENS_PER_SECOND, "sample_rate": 16000},
                     {"z": rng.standard_normal((n, width), np.float32)})
    writer.close()
    _shards.merge(directory)
    return directory


def throughput(directory: Path, *, pack: bool, tokens: int, batch_size: int,
               max_batches: int) -> dict:
    dataset = data.latent_dataset(directory, tokens=tokens, batch_size=batch_size, pack=pack)
    iterator = iter(dataset)
    next(iterator)  # the first batch opens the shards
    batches = real = 0
    start = time.perf_counter()
    for batch in iterator:
        batches += 1
        real += int((batch["segment_ids"] > 0).sum() if pack else batch["mask"].sum())
        if batches == max_batches:
            break
    seconds = time.perf_counter() - start
    return {"pack": pack, "tokens": tokens, "batch_size": batch_size, "batches": batches,
            "seconds": seconds, "batches_per_s": batches / seconds,
            "tokens_per_s": batches * batch_size * tokens / seconds,
            "real_tokens_per_s": real / seconds}


def packing_efficiency(work: Path, distribution: str, count: int, tokens: int,
                       bins: int) -> dict:
    """Real tokens over row tokens for one epoch of `count` clips (width-1 latents: only the
    lengths matter)."""
    directory = write_extraction(work / f"lengths-{distribution}-{count}",
                                 clip_tokens(count, distribution, seed=1), width=1)
    rows = real = 0
    dataset = data.latent_dataset(directory, tokens=tokens, batch_size=1, pack=True,
                                  num_packing_bins=bins, normalize=False, drop_remainder=False)
    for batch in dataset:
        rows += 1
        real += int((batch["segment_ids"] > 0).sum())
    return {"distribution": distribution, "clips": count, "tokens": tokens, "bins": bins,
            "rows": rows, "efficiency": real / (rows * tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--max_batches", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) /
                        "losatok-bench" / "latents")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    lengths = clip_tokens(args.records, "uniform")
    directory = write_extraction(args.workdir / f"records-{args.records}", lengths)
    results = {"machine": _cpu_model(), "records": args.records,
               "record_tokens": int(lengths.sum()), "throughput": [], "packing": []}
    for pack, tokens, batch_size in ((False, 256, 32), (False, 750, 16), (True, 1024, 16),
                                     (True, 4096, 8)):
        row = throughput(directory, pack=pack, tokens=tokens, batch_size=batch_size,
                         max_batches=args.max_batches)
        results["throughput"].append(row)
        print(json.dumps(row), flush=True)
    for distribution in ("uniform", "log-uniform"):
        for tokens in (1024, 4096):
            for bins in (16, 64, 256):
                row = packing_efficiency(args.workdir, distribution, 2000, tokens, bins)
                results["packing"].append(row)
                print(json.dumps(row), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
