"""Long audio in bounded memory, and bucketed batching against one clip at a time.

    python -m benchmarks.long_audio --minutes 60                # full size, random weights
    python -m benchmarks.long_audio --minutes 2 --batching      # plus the batching comparison

Reconstructs a long synthetic recording through the windowed path and reports wall time, × realtime
and peak RSS next to the parameter bytes (the goal: parameters + 2 GB, whatever the duration).
Random weights are fine: memory and speed do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np

import losatok_jax
from losatok_jax.config import LosatokConfig, load_config


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated noise, generated in slices to keep the input the only big array."""
    rng = np.random.default_rng(seed)
    total = int(seconds * 16000)
    audio = np.empty(total, np.float32)
    for start in range(0, total, 16000 * 60):
        piece = rng.standard_normal(min(16000 * 60, total - start)).astype(np.float32)
        t = (start + np.arange(len(piece))) / 16000
        audio[start:start + len(piece)] = 0.1 * piece * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    return audio


def long_reconstruction(model: losatok_jax.Losatok, minutes: float) -> dict:
    audio = synthetic_audio(60 * minutes)
    start = time.perf_counter()
    [latents] = losatok_jax.encode(model, [audio], features=("z",))
    encoded = time.perf_counter()
    [output] = losatok_jax.api.decode(model, [latents["z"]])
    decoded = time.perf_counter()
    assert output.shape == (640 * len(latents["z"]),) and np.isfinite(output).all()
    seconds = len(audio) / 16000
    return {"minutes": minutes, "encode_s": encoded - start, "decode_s": decoded - encoded,
            "x_realtime": seconds / (decoded - start), "peak_rss_gb": peak_rss_gb()}


def batching_throughput(model: losatok_jax.Losatok, clips: int, seed: int = 1) -> dict:
    """Audio seconds per second for mixed-length clips: one call on the list vs one per clip.

    Both sides run after warm-up on the same shapes, so neither pays compilation.
    """
    rng = np.random.default_rng(seed)
    batch = [synthetic_audio(rng.uniform(1.0, 12.0), seed=i) for i in range(clips)]
    seconds = sum(len(c) for c in batch) / 16000
    losatok_jax.encode(model, batch, features=("z",))  # warm the shapes both sides use
    for clip in batch:
        losatok_jax.encode(model, [clip], features=("z",))
    start = time.perf_counter()
    losatok_jax.encode(model, batch, features=("z",))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for clip in batch:
        losatok_jax.encode(model, [clip], features=("z",))
    single = time.perf_counter() - start
    return {"clips": clips, "audio_s": seconds, "batched_x_realtime": seconds / batched,
            "one_at_a_time_x_realtime": seconds / single, "speedup": single / batched}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_path", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--batching", action="store_true", help="also compare batching")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    config: LosatokConfig = load_config(args.config_path)
    params = losatok_jax.init_params(config, jax.random.key(0))
    model = losatok_jax.Losatok(params, config)
    param_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30
    results = {"device": jax.devices()[0].device_kind, "param_gb": param_gb,
               "rss_after_load_gb": peak_rss_gb()}
    if args.batching:
        results["batching"] = batching_throughput(model, args.clips)
    results["long"] = long_reconstruction(model, args.minutes)
    results["long"]["goal_gb"] = param_gb + 2
    print(json.dumps(results, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
