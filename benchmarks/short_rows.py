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

import numpy as np

from benchmarks.run import jax_matmul_peak, torch_matmul_peak
from benchmarks.scan_overhead import median_seconds

WIDTH, MLP_WIDTH, LAYERS = 1280, 5120, 32
# One block's matmuls, (in, out): qkv, attention output projection, MLP up, MLP down.
SHAPES = ((WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, MLP_WIDTH), (MLP_WIDTH, WIDTH))


def jax_layers_seconds(tokens: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
               for _ in range(LAYERS) for shape in SHAPES]
    x = {n: jnp.asarray(rng.standard_normal((tokens, n), np.float32)) for n in (WIDTH, MLP_WIDTH)}
    dot = jax.jit(jnp.dot)
    return median_seconds(lambda: [dot(x[w.shape[0]], w) for w in weights], repeats=repeats)


def torch_layers_seconds(tokens: int, repeats: int) -> float:
    import torch

    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) * 0.02
               for _ in range(LAYERS) for shape in SHAPES]
    x = {n: torch.randn(tokens, n, generator=generator) for n in (WIDTH, MLP_WIDTH)}
    return median_seconds(lambda: [torch.mm(x[w.shape[0]], w) for w in weights], repeats=repeats)


def summary(seconds: float, peak_flops: float, tokens: int) -> dict:
    weights = LAYERS * sum(i * o for i, o in SHAPES)
    flops = 2 * tokens * weights
    return {"seconds": seconds, "gflops": flops / seconds / 1e9,
            "fraction_of_peak": flops / seconds / peak_flops, "peak_gflops": peak_flops / 1e9,
            "weight_gb_per_s": 4 * weights / seconds / 1e9}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=25)
    parser.add_argument("--peak-n", type=int, default=4096, help="side of the peak matmul")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes (median)")
    args = parser.parse_args(argv)
    results = {"tokens": args.tokens, "layers": LAYERS,
               "jax": summary(jax_layers_seconds(args.tokens, args.repeats),
                              jax_matmul_peak(args.peak_n, "float32"), args.tokens),
               "pytorch": summary(torch_layers_seconds(args.tokens, args.repeats),
                                  torch_matmul_peak(args.peak_n, "cpu"), args.tokens)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
