"""What scanning over stacked layer weights costs: one full-size encoder block per layer, run as
a trace runs it (`nn.scan` over stacked parameters) and as a host loop over separate per-layer
weights (what the CPU `Runner` runs, on views of the stacked weights).

    python -m benchmarks.scan_overhead --tokens 25,252 --layers 8

XLA's while loop slices each iteration's weights out of the stacked arrays, a copy of ~79 MB per
transformer block at full size; a separate array per layer needs no copy.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax._layers import TransformerBlock
from losatok_jax.config import load_config


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(config_path: str, tokens: int, layers: int, repeats: int) -> dict:
    s = load_config(config_path).semantic
    block = TransformerBlock(s.num_heads, s.mlp_dim, s.qkv_bias, s.init_values)
    x = jnp.ones((1, tokens, s.embed_dim), jnp.float32)
    mask = jnp.ones((1, tokens), bool)

    scanned = nn.scan(TransformerBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=layers)(
        s.num_heads, s.mlp_dim, s.qkv_bias, s.init_values)
    stacked = scanned.init(jax.random.key(0), x, mask)
    run_scanned = jax.jit(lambda p, x, m: scanned.apply(p, x, m)[0])
    scan_s = median_seconds(run_scanned, stacked, x, mask, repeats=repeats)
    del stacked

    per_layer = [block.init(jax.random.key(i), x, mask) for i in range(layers)]
    run_block = jax.jit(lambda p, x, m: block.apply(p, x, m)[0])

    def host_loop(per_layer, x, mask):
        for params in per_layer:
            x = run_block(params, x, mask)
        return x

    loop_s = median_seconds(host_loop, per_layer, x, mask, repeats=repeats)
    return {"tokens": tokens, "layers": layers, "scanned_ms_per_block": 1e3 * scan_s / layers,
            "separate_weights_ms_per_block": 1e3 * loop_s / layers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_path", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--tokens", default="25,252", help="comma-separated chunk lengths")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    rows = [measure(args.config_path, int(t), args.layers, args.repeats)
            for t in args.tokens.split(",")]
    print(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
