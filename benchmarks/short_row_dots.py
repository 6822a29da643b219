"""Where the CPU layer programs should switch from Eigen's dots to XLA's default (YNNPACK) ones:
one full-size encoder and decoder layer per row count, compiled both ways, timed interleaved.

    python -m benchmarks.short_row_dots --rows 25,50,64,100,126,252 --output results/x.json

The CPU Runner compiles its per-layer programs for fewer than `CPU_SHORT_ROWS` rows with Eigen's
dots (`losatok_jax.model._apply_short_layer`) and the rest with XLA's default
(`_apply_layer`). Each pass runs `--layers` layers on their own random weights, so the weights
stream from memory as they do in the model. `speedup` is default time over Eigen time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import _cpu_model, print_json
from losatok_jax import model as losatok_model
from losatok_jax._modules import decoder_block, semantic_block
from losatok_jax.config import load_config

PROGRAMS = {"xla_default": losatok_model._apply_layer, "eigen": losatok_model._apply_short_layer}


def layer_inputs(config, stack: str, rows: int):
    if stack == "semantic":
        x = jax.random.normal(jax.random.key(0), (1, rows, config.semantic.embed_dim))
        return x, jnp.ones((1, rows), bool)
    x = jax.random.normal(jax.random.key(0), (1, rows, config.decoder_embed_dim))
    return x, jnp.ones((1, rows, 1))


def layer_weights(config, stack: str, count: int) -> list:
    block = semantic_block(config.semantic) if stack == "semantic" else decoder_block(config)
    x, mask = layer_inputs(config, stack, 4)
    init = jax.jit(lambda key: block.init(key, x, mask)["params"])
    return [init(jax.random.key(i)) for i in range(count)]


def measure(config, stack: str, weights: list, rows: int, repeats: int) -> dict:
    x, mask = layer_inputs(config, stack, rows)

    def one_pass(program):
        for w in weights:
            out = program(w, x, mask, config=config, dtype="float32", stack=stack)
        return jax.block_until_ready(out)

    times = {name: [] for name in PROGRAMS}
    for program in PROGRAMS.values():
        one_pass(program)
    for _ in range(repeats):
        for name, program in PROGRAMS.items():
            start = time.perf_counter()
            one_pass(program)
            times[name].append((time.perf_counter() - start) / len(weights))
    result = {"rows": rows, **{f"{name}_ms": 1e3 * float(np.median(t))
                               for name, t in times.items()}}
    result["speedup"] = result["xla_default_ms"] / result["eigen_ms"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--rows", default="25,50,64,100,126,252", metavar="R,R,...")
    parser.add_argument("--layers", type=int, default=8, help="layers (own weights) per pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per program (median)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    rows = [int(r) for r in args.rows.split(",")]
    results = {"machine": _cpu_model(), "cpu_short_rows": losatok_model.CPU_SHORT_ROWS,
               "layers_per_pass": args.layers}
    for stack in ("semantic", "decoder"):
        weights = layer_weights(config, stack, args.layers)
        results[stack] = [measure(config, stack, weights, r, args.repeats) for r in rows]
        del weights
    print_json(results, args.output)


if __name__ == "__main__":
    main()
