"""Which weight layout XLA's CPU dots read fastest: one full-size encoder and decoder layer per row
count, with its linear weights stored (out, in) as this package's `_layers.Linear` holds them
(x · Wᵀ) and (in, out) as Flax's Dense does (x @ W), the latter also with Eigen's dots instead of
XLA's default YNNPACK ones (the per-program option `xla_cpu_experimental_ynn_fusion_type=""`).

    python -m benchmarks.kernel_layout --rows 25,50,100,252,1008 --output results/x.json

Each pass runs `--layers` layers on their own random weights, so the weights stream from memory as
they do in the model; the programs are timed interleaved. `speedup_vs_best_in_out` is the faster
(in, out) program's time over the (out, in) one's.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import _cpu_model, print_json
from losatok_jax import _layers
from losatok_jax._modules import decoder_block, semantic_block
from losatok_jax.config import load_config
from losatok_jax.model import _layer

EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
PROGRAMS = ("out_in", "in_out", "in_out_eigen")


class InOutLinear(_layers.Linear):
    """`Linear` with Flax Dense's (in, out) `kernel`."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x.shape[-1], self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def layout(program: str):
    """The layers built inside hold their linear weights as `program` stores them."""
    return mock.patch.object(_layers, "Linear",
                             _layers.Linear if program == "out_in" else InOutLinear)


def layer_inputs(config, stack: str, rows: int):
    """One batch of `rows` rows as the model runs them: encoder rows in semantic chunks (a batch
    of `rows / chunk_tokens` chunks where that divides), decoder rows as one sequence."""
    if stack == "semantic":
        chunk = config.semantic.chunk_tokens
        shape = (rows // chunk, chunk) if rows > chunk and rows % chunk == 0 else (1, rows)
        x = jax.random.normal(jax.random.key(0), (*shape, config.semantic.embed_dim))
        return x, jnp.ones(shape, bool)
    x = jax.random.normal(jax.random.key(0), (1, rows, config.decoder_embed_dim))
    return x, jnp.ones((1, rows, 1))


def layer_weights(config, stack: str, count: int, program: str) -> list:
    block = semantic_block(config.semantic) if stack == "semantic" else decoder_block(config)
    x, mask = layer_inputs(config, stack, 4)
    with layout(program):
        init = jax.jit(lambda key: block.init(key, x, mask)["params"])
        return [init(jax.random.key(i)) for i in range(count)]


def compiled_layer(config, stack: str, program: str, weights, x, mask):
    def apply(w, x, mask):
        return _layer(w, x, mask, config=config, dtype="float32", stack=stack)

    options = EIGEN_DOTS if program == "in_out_eigen" else None
    with layout(program):
        return jax.jit(apply).lower(weights, x, mask).compile(compiler_options=options)


def measure(config, stack: str, weights: dict, rows: int, repeats: int) -> dict:
    x, mask = layer_inputs(config, stack, rows)
    compiled = {p: compiled_layer(config, stack, p, weights[p][0], x, mask) for p in PROGRAMS}

    def one_pass(program):
        for w in weights[program]:
            out = compiled[program](w, x, mask)
        return jax.block_until_ready(out)

    times = {p: [] for p in PROGRAMS}
    for p in PROGRAMS:
        one_pass(p)
    for _ in range(repeats):
        for p in PROGRAMS:
            start = time.perf_counter()
            one_pass(p)
            times[p].append((time.perf_counter() - start) / len(weights[p]))
    result = {"rows": rows, **{f"{p}_ms": 1e3 * float(np.median(t)) for p, t in times.items()}}
    best_in_out = min(result["in_out_ms"], result["in_out_eigen_ms"])
    result["speedup_vs_best_in_out"] = best_in_out / result["out_in_ms"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/16k_16k_25Hz_losatok.yml")
    parser.add_argument("--rows", default="25,50,100,252,1008", metavar="R,R,...")
    parser.add_argument("--layers", type=int, default=6, help="layers (own weights) per pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per program (median)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    rows = [int(r) for r in args.rows.split(",")]
    results = {"machine": _cpu_model(), "layers_per_pass": args.layers}
    for stack in ("semantic", "decoder"):
        weights = {p: layer_weights(config, stack, args.layers, p) for p in PROGRAMS[:2]}
        weights["in_out_eigen"] = weights["in_out"]
        results[stack] = [measure(config, stack, weights, r, args.repeats) for r in rows]
        del weights
    print_json(results, args.output)


if __name__ == "__main__":
    main()
