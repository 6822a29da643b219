"""What packing decode windows into shared rows gains: a batch of mixed-length latents decoded with
`_batching.pack_decode_rows` and with a row per window (what decoding did before packing), timed
interleaved in one process on one model.

    python -m benchmarks.decode_packing --clips 8 --range 1,12 --output results/x.json

The clip lengths are `benchmarks.run`'s mixed batch (`mixed_durations`); speed is content-blind,
so the latents are random and so are the full-size weights (from `--config_path`, or
`--model_path` for a converted checkpoint). `max_abs_difference` compares the two plans' audio.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np

from benchmarks.run import _cpu_model, mixed_durations, print_json
from losatok_jax import Buckets, DEFAULT_BUCKETS, _batching, decode, load_losatok
from losatok_jax.model import Runner

PLANS = ("packed", "row_per_window")


def row_per_window(config, buckets: Buckets, pieces) -> list[_batching.Row]:
    return [_batching.Row(buckets.length(p.stop - p.source), ((p, 0),)) for p in pieces]


def plan(name: str):
    """Decoding inside plans its rows as `name` says."""
    return mock.patch.object(_batching, "pack_decode_rows",
                             _batching.pack_decode_rows if name == "packed" else row_per_window)


def tokens_computed(config, buckets: Buckets, lengths) -> dict[str, int]:
    computed = {}
    for name in PLANS:
        with plan(name):
            rows = _batching.decode_rows(config, buckets, lengths)
            computed[name] = sum(row.length for row in rows)
    return computed


def measure(model, latents, repeats: int, buckets: Buckets = DEFAULT_BUCKETS) -> dict:
    runner = Runner(model)
    audio, times = {}, {name: [] for name in PLANS}
    for name in PLANS:  # first calls compile
        with plan(name):
            audio[name] = decode(model, latents, buckets=buckets, runner=runner)
    for _ in range(repeats):
        for name in PLANS:
            with plan(name):
                start = time.perf_counter()
                decode(model, latents, buckets=buckets, runner=runner)
                times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    lengths = [len(z) for z in latents]
    return {"tokens": sum(lengths), "lengths": lengths,
            "tokens_computed": tokens_computed(model.config, buckets, lengths),
            "times_s": times, "median_s": median,
            "speedup": median["row_per_window"] / median["packed"],
            "max_abs_difference": max(float(np.max(np.abs(a - b)))
                                      for a, b in zip(audio["packed"], audio["row_per_window"]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_path", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--model_path", default=None, help="a converted checkpoint instead")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--range", default="1,12", help="clip durations: low,high seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    low, high = (float(s) for s in args.range.split(","))
    model = (load_losatok(args.model_path) if args.model_path
             else load_losatok(config_path=args.config_path))
    c = model.config
    seconds = mixed_durations(args.clips, (low, high))
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal((c.num_tokens(int(round(s * c.sample_rate))), c.decoder_dim))
               .astype(np.float32) for s in seconds]
    result = measure(model, latents, args.repeats)
    print_json({"machine": _cpu_model(), "clips": args.clips, "range_s": [low, high], **result},
               args.output)


if __name__ == "__main__":
    main()
