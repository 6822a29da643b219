"""Where a semantic transformer layer's time goes on a TPU, by the compiler's estimate.

    python -m benchmarks.layer_parts [--target v5e-8] [--tokens 252] [--batch 8] [--output F]

Each part of one layer of the released config (bfloat16, one chip's rows at extraction's batch)
compiled alone for the TPU (the TPU extra, on this CPU): the qkv and output projections and the
MLP as the layer's matrix products, the attention core as the layer computes it on a TPU
(`_layers.heads_major_attention`: float32 logits and softmax), the same attention with 128-wide
heads of the same total width, and square matrix products for the compiler's own ceiling. Each
row: the compiler's time, FLOPs, and their fraction of the chip's bfloat16 peak.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from losatok_jax import _layers, plan
from losatok_jax.config import RELEASED_CONFIG, load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="v5e-8", choices=sorted(plan.TARGETS))
    parser.add_argument("--tokens", type=int, default=252)
    parser.add_argument("--batch", type=int, default=8, help="rows per chip")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    target = plan.TARGETS[args.target]
    chip = jax.sharding.SingleDeviceSharding(plan.compile_only_devices(target)[0])
    s = load_config(RELEASED_CONFIG).semantic
    rows, width, heads, hidden = args.batch * args.tokens, s.embed_dim, s.num_heads, s.mlp_dim

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=chip)

    def attention(q, k, v, mask):
        return _layers.heads_major_attention(q, k, v, mask, q.shape[-1] ** -0.5)

    def qkv(heads_of: int):
        return [spec(args.batch, args.tokens, heads_of, width // heads_of)] * 3 + [
            spec(args.batch, args.tokens, dtype=jnp.bool_)]

    parts = [
        ("qkv projection", lambda x, w: x @ w, 2 * rows * width * 3 * width,
         [spec(rows, width), spec(width, 3 * width)]),
        ("output projection", lambda x, w: x @ w, 2 * rows * width * width,
         [spec(rows, width), spec(width, width)]),
        ("MLP", lambda x, w1, w2: jax.nn.gelu(x @ w1) @ w2, 4 * rows * width * hidden,
         [spec(rows, width), spec(width, hidden), spec(hidden, width)]),
        (f"attention core ({width // heads}-wide heads)", attention,
         4 * rows * args.tokens * width, qkv(heads)),
        ("attention core (128-wide heads)", attention, 4 * rows * args.tokens * width,
         qkv(width // 128)),
        ("4096x4096x4096 product", lambda a, b: a @ b, 2 * 4096 ** 3,
         [spec(4096, 4096), spec(4096, 4096)]),
        ("8192x8192x8192 product", lambda a, b: a @ b, 2 * 8192 ** 3,
         [spec(8192, 8192), spec(8192, 8192)]),
    ]
    results = []
    for name, fn, flops, inputs in parts:
        seconds = plan.measure(jax.jit(fn).lower(*inputs), 1)["estimated_seconds"]
        results.append({"part": name, "estimated_seconds": seconds, "flops": flops,
                        "fraction_of_peak": flops / seconds / target.bf16_flops})
        print(f"{name}: {seconds * 1e6:.1f} us, {flops / 1e9:.2f} GFLOP, "
              f"{results[-1]['fraction_of_peak']:.0%} of peak", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"target": target.topology, "tokens": args.tokens, "batch": args.batch,
                       "parts": results}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
