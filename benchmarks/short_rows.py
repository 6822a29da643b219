"""The ceiling for short rows: the matmuls of the full-size encoder's 32 blocks at a few token
counts (25: one 1 s clip), each block on its own weights as the model streams them, in JAX, PyTorch
and NumPy (OpenBLAS), each against a large square matmul in the same library, with the weights in
either of two layouts.

    python -m benchmarks.short_rows --tokens 1,25,50,100,252 --output benchmarks/results/short_rows_cpu.json

With 25 rows a matmul does only 50 FLOPs per weight it reads, and each library's small-matrix
kernels run well below its large-matmul peak: the fraction reached here is the ceiling for a model
that runs one 1 s clip through that library's matmuls. Per library and layout, a least-squares line
seconds = stream + tokens · per_token over the token counts splits the time into a part that does
not grow with rows (reading the 2.5 GB of weights, at `stream_gb_per_s`) and one that does
(arithmetic, at `compute_gflops`): where the two add up instead of overlapping, the fraction of
peak at T rows is at most compute / (stream + compute). `memory_read_gb_per_s` (a plain jitted
sum) is how fast this machine can read memory, for comparison with the stream rate.

Layouts: `in_out` is x @ W with W stored (in, out), as Flax's Dense holds it; `out_in` is x @ Wᵀ
with W stored (out, in), as PyTorch's Linear (`F.linear`) and this package's checkpoints hold it;
`feature_major` is W · x with W stored (out, in) and the activations stored (features, tokens), so
the weights are the left operand and the rows the right one's columns (what a model that kept its
activations feature-major would run; a transpose after the product is folded back into x @ Wᵀ).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from benchmarks.run import _cpu_model, jax_matmul_peak, print_json, torch_matmul_peak
from benchmarks.scan_overhead import median_seconds

WIDTH, MLP_WIDTH, LAYERS = 1280, 5120, 32
# One block's matmuls, (in, out): qkv, attention output projection, MLP up, MLP down.
SHAPES = ((WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, MLP_WIDTH), (MLP_WIDTH, WIDTH))
WEIGHTS_PER_TOKEN = LAYERS * sum(i * o for i, o in SHAPES)
LAYOUTS = ("in_out", "out_in", "feature_major")


def host_weights(layout: str, layers: int = LAYERS) -> list[np.ndarray]:
    """The blocks' weights, each contiguous in `layout`; the same values in every layout."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape, np.float32) * 0.02
               for _ in range(layers) for shape in SHAPES]
    return weights if layout == "in_out" else [np.ascontiguousarray(w.T) for w in weights]


def host_inputs(tokens: int, layout: str) -> dict[int, np.ndarray]:
    """Per input width, the activations: (tokens, width), or (width, tokens) feature-major."""
    rng = np.random.default_rng(1)
    rows = {n: rng.standard_normal((tokens, n), np.float32) for n in (WIDTH, MLP_WIDTH)}
    if layout == "feature_major":
        return {n: np.ascontiguousarray(x.T) for n, x in rows.items()}
    return rows


def in_features(w, layout: str) -> int:
    return w.shape[0] if layout == "in_out" else w.shape[1]


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls of `fn` after one untimed call."""
    import jax

    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


@dataclasses.dataclass(frozen=True)
class Library:
    """How one library holds an array, multiplies x by a weight of either layout, and its peak."""

    array: Callable[[np.ndarray], Any]
    products: dict[str, Callable[[Any, Any], Any]]  # layout -> product(x, w)
    peak_flops: Callable[[int], float]  # side of the square matmul -> FLOP/s

    def timer(self, weights: list[np.ndarray], layout: str):
        """seconds(tokens, repeats) for one pass over `weights`, moved into the library once."""
        held = [self.array(w) for w in weights]
        product = self.products[layout]

        def seconds(tokens: int, repeats: int) -> float:
            x = {n: self.array(v) for n, v in host_inputs(tokens, layout).items()}
            return median_seconds(lambda: [product(x[in_features(w, layout)], w) for w in held],
                                  repeats=repeats)

        return seconds


def jax_library() -> Library:
    import jax
    import jax.numpy as jnp

    times_transposed = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    return Library(jnp.asarray, {"in_out": jax.jit(jnp.dot), "out_in": times_transposed,
                                 "feature_major": jax.jit(lambda x, w: jnp.dot(w, x))},
                   lambda n: jax_matmul_peak(n, "float32"))


def pytorch_library() -> Library:
    import torch

    torch.set_grad_enabled(False)
    return Library(torch.from_numpy, {"in_out": torch.mm, "out_in": torch.nn.functional.linear,
                                      "feature_major": lambda x, w: torch.mm(w, x)},
                   lambda n: torch_matmul_peak(n, "cpu"))


def numpy_library() -> Library:
    def peak_flops(n: int) -> float:
        square = np.random.default_rng(2).standard_normal((n, n), np.float32)
        return 2 * n**3 / best_seconds(lambda: square @ square)  # best of 5, as the others

    return Library(np.asarray, {"in_out": lambda x, w: x @ w, "out_in": lambda x, w: x @ w.T,
                                "feature_major": lambda x, w: w @ x},
                   peak_flops)


def jax_read_gb_per_s(gib: int = 1) -> float:
    """Memory read bandwidth: a jitted sum over `gib` GiB of float32, best of 5."""
    import jax
    import jax.numpy as jnp

    data = jnp.ones(gib * 2**28, jnp.float32)
    total = jax.jit(jnp.sum)
    return data.nbytes / best_seconds(lambda: total(data)) / 1e9


LIBRARIES = {"jax": jax_library, "pytorch": pytorch_library, "numpy": numpy_library}


def row(tokens: int, seconds: float, peak_flops: float) -> dict:
    flops = 2 * tokens * WEIGHTS_PER_TOKEN
    return {"tokens": tokens, "seconds": seconds, "gflops": flops / seconds / 1e9,
            "fraction_of_peak": flops / seconds / peak_flops,
            "weight_gb_per_s": 4 * WEIGHTS_PER_TOKEN / seconds / 1e9}


def stream_compute_fit(rows: list[dict]) -> dict:
    """The least-squares line seconds = stream + tokens · per_token through the rows."""
    per_token, stream = np.polyfit([r["tokens"] for r in rows], [r["seconds"] for r in rows], 1)
    return {"stream_s": float(stream), "stream_gb_per_s": 4 * WEIGHTS_PER_TOKEN / stream / 1e9,
            "compute_gflops": 2 * WEIGHTS_PER_TOKEN / per_token / 1e9}


def measure(library: str, layouts: list[str], token_counts: list[int], repeats: int,
            peak_n: int) -> dict:
    """One library's peak, then per layout its rows (and their fit, given two or more)."""
    chosen = LIBRARIES[library]()
    peak_flops = chosen.peak_flops(peak_n)
    result: dict = {"peak_gflops": peak_flops / 1e9, "layouts": {}}
    for layout in layouts:
        seconds = chosen.timer(host_weights(layout), layout)
        rows = [row(t, seconds(t, repeats), peak_flops) for t in token_counts]
        result["layouts"][layout] = {"rows": rows}
        if len(rows) > 1:
            result["layouts"][layout]["fit"] = stream_compute_fit(rows)
    return result


def _names(text: str, known, what: str, parser) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"--{what} takes any of {', '.join(known)}, got {text!r}")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,25,50,100,252", metavar="T,T,...",
                        help="rows per matmul, one measurement each")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), metavar="NAME,...",
                        help=f"any of {', '.join(LIBRARIES)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), metavar="NAME,...",
                        help=f"any of {', '.join(LAYOUTS)}")
    parser.add_argument("--peak-n", type=int, default=4096, help="side of the peak matmul")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes (median)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens takes comma-separated integers, got {args.tokens!r}")
    if min(token_counts) < 1:
        parser.error("--tokens must be positive")
    libraries = _names(args.libraries, LIBRARIES, "libraries", parser)
    layouts = _names(args.layouts, LAYOUTS, "layouts", parser)
    results = {"machine": _cpu_model(), "layers": LAYERS,
               "weights_gb": 4 * WEIGHTS_PER_TOKEN / 1e9,
               "memory_read_gb_per_s": jax_read_gb_per_s(),
               "libraries": {name: measure(name, layouts, token_counts, args.repeats, args.peak_n)
                             for name in libraries}}
    print_json(results, args.output)


if __name__ == "__main__":
    main()
