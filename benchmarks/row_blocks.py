"""Long rows through one full-size decoder (ConvNeXt) layer, its position-wise matmuls in one go
and in blocks of at most `CPU_MATMUL_ROWS` rows (what the CPU `Runner` runs).

    python -m benchmarks.row_blocks --frames 1008,1600,3200,8064

A decoder window of T tokens is 2·T frames a row, and a batch of rows shares the matmuls: 60 s
decodes as one row of 3024 frames, long audio as 2 × 3024. XLA's CPU matmul slows past about 2000 rows;
the two variants are timed interleaved, so load changes hit both alike.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import jax_matmul_peak, print_json
from losatok_jax._modules import CPU_MATMUL_ROWS, decoder_block
from losatok_jax.config import load_config


def layer_params(config):
    """One decoder layer's random weights (their shapes do not depend on the row length)."""
    x = jnp.zeros((1, 1, config.decoder_embed_dim))
    return decoder_block(config).init(jax.random.key(1), x, jnp.ones((1, 1, 1)))


def measure(config, params, frames: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (1, frames, config.decoder_embed_dim))
    keep = np.ones((1, frames, 1), np.float32)
    variants = {"whole_rows": False, "row_blocks": True}
    calls = {name: jax.jit(lambda p, x, keep, cpu=cpu: decoder_block(config, None, cpu).apply(
        p, x, keep)[0]) for name, cpu in variants.items()}
    times = {name: [] for name in calls}
    for call in calls.values():
        jax.block_until_ready(call(params, x, keep))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call(params, x, keep))
            times[name].append(time.perf_counter() - start)
    flops = 4 * frames * config.decoder_embed_dim * config.decoder_intermediate_size
    result = {"frames": frames}
    for name, seconds in times.items():
        median = float(np.median(seconds))
        result[name] = {"seconds": median, "pointwise_gflops": flops / median / 1e9}
    result["speedup"] = result["whole_rows"]["seconds"] / result["row_blocks"]["seconds"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--frames", default="1008,1600,3200,8064",
                        help="comma-separated rows (decoder frames) of one layer call")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per variant (median)")
    parser.add_argument("--output", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    params = layer_params(config)
    results = {"max_rows": CPU_MATMUL_ROWS,
               "matmul_peak_gflops": jax_matmul_peak(4096, "float32") / 1e9,
               "rows": [measure(config, params, int(f), args.repeats)
                        for f in args.frames.split(",")]}
    print_json(results, args.output)


if __name__ == "__main__":
    main()
