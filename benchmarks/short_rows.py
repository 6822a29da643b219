"""The ceiling for a single short row: the matmuls of the full-size encoder's 32 blocks at 25 tokens
(one 1 s clip), each block on its own weights as the model streams them, in JAX and in PyTorch.

    python -m benchmarks.short_rows --tokens 25

With 25 rows a matmul does only 50 FLOPs per weight it reads, and each library's small-matrix
kernels run well below its large-matmul peak. The fraction of peak reached here is the ceiling for
a model that runs one 1 s clip through that library's matmuls; `weight_gb_per_s` shows how fast the
weights stream (against the memory bandwidth, which a plain reduction measures far higher).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

WIDTH, MLP_WIDTH, LAYERS = 1280, 5120, 32
# One block's matmuls, (in, out): qkv, attention output projection, MLP up, MLP down.
SHAPES = ((WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, MLP_WIDTH), (MLP_WIDTH, WIDTH))


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_rates(tokens: int, peak_n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
               for _ in range(LAYERS) for shape in SHAPES]
    x = {n: jnp.asarray(rng.standard_normal((tokens, n), np.float32)) for n in (WIDTH, MLP_WIDTH)}
    dot = jax.jit(jnp.dot)

    def all_layers():
        jax.block_until_ready([dot(x[w.shape[0]], w) for w in weights])

    square = jnp.asarray(rng.standard_normal((peak_n, peak_n), np.float32))
    return {"layers_s": median_seconds(all_layers, repeats),
            "peak_s": median_seconds(lambda: dot(square, square).block_until_ready(), repeats)}


def torch_rates(tokens: int, peak_n: int, repeats: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02
               for _ in range(LAYERS) for shape in SHAPES]
    x = {n: torch.randn(tokens, n, generator=generator) for n in (WIDTH, MLP_WIDTH)}

    def all_layers():
        for w in weights:
            torch.mm(x[w.shape[0]], w)

    square = torch.randn(peak_n, peak_n, generator=generator)
    return {"layers_s": median_seconds(all_layers, repeats),
            "peak_s": median_seconds(lambda: torch.mm(square, square), repeats)}


def summary(rates: dict, tokens: int, peak_n: int) -> dict:
    weights = LAYERS * sum(i * o for i, o in SHAPES)
    flops, peak = 2 * tokens * weights, 2 * peak_n ** 3 / rates["peak_s"]
    return {"seconds": rates["layers_s"], "gflops": flops / rates["layers_s"] / 1e9,
            "fraction_of_peak": flops / rates["layers_s"] / peak, "peak_gflops": peak / 1e9,
            "weight_gb_per_s": 4 * weights / rates["layers_s"] / 1e9}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=25)
    parser.add_argument("--peak-n", type=int, default=4096, help="side of the peak matmul")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    results = {"tokens": args.tokens, "layers": LAYERS}
    for name, rates in (("jax", jax_rates), ("pytorch", torch_rates)):
        results[name] = summary(rates(args.tokens, args.peak_n, args.repeats), args.tokens,
                                args.peak_n)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
