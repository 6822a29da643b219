"""How exact is `plan`'s time estimate for a layer stack? Against a fully unrolled compile.

    python -m benchmarks.stack_estimate [--target v5e-8] [--encode 16,100,252]
        [--decode 16,252,1512] [--output FILE.json]

The compiler costs a scan's body once, so `plan` costs each stack (released config, bfloat16,
extraction's batch) from its first layer and its first two compiled straight-line, each sliced
from the whole stack's weights: one layer plus (depth - 1) times what the second adds. This
compiles, per bucket, the whole stack unrolled (all 32 or 12 layers straight-line, minutes per
bucket) and sets its estimate beside `plan`'s, and beside cheaper ways that were tried: the
same extrapolation from layers given only two layers' weights (the compiler lays a two-layer
stack out otherwise), depth times one layer, depth times the scan program's own estimate, and
the scan unrolled by two (its body two layers) extrapolated like the layers.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax

from losatok_jax import _batching, _programs, plan
from losatok_jax._execution import program_plan
from losatok_jax.config import RELEASED_CONFIG, load_config


@functools.partial(jax.jit, static_argnames=("config", "dtype", "stack", "unroll"))
def scanned_layers(weights, x, mask, *, config, dtype: str, stack: str, unroll: int):
    """Every layer of the stack as a scan whose body holds `unroll` layers."""
    def layer(x, weights):
        return _programs.apply_layer(weights, x, mask, config=config, dtype=dtype, stack=stack,
                                     max_rows=None), None

    return jax.lax.scan(layer, x, weights, unroll=unroll)[0]


def _tokens(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def measure_bucket(config, runner, devices, model, operation: str, tokens: int) -> dict:
    chips = len(devices)
    stack = plan.STACK_OF[operation]
    depth = plan.stack_depth(model, stack)
    buckets = _batching.extraction_buckets(8, (tokens,))
    [program] = [p for p in program_plan(runner, buckets, keys=("z",), largest_batch_only=True,
                                         encode_too=operation == "encode",
                                         decode_too=operation == "decode")
                 if p.stage == "stack" and p.tokens == tokens]
    one_chip = jax.sharding.SingleDeviceSharding(devices[0])
    x, mask = plan.chip_rows(program, chips, one_chip)
    whole = plan._stack_weights(model, stack, one_chip)
    two = jax.tree.map(lambda w: jax.ShapeDtypeStruct((2, *w.shape[1:]), w.dtype,
                                                      sharding=one_chip), whole)

    def layers(weights, count: int) -> dict:
        return plan.measure(plan.consecutive_layers.lower(
            weights, x, mask, config=config, dtype=model.dtype, stack=stack, count=count), 1)

    def scanned(unroll: int) -> dict:
        return plan.measure(scanned_layers.lower(
            whole, x, mask, config=config, dtype=model.dtype, stack=stack, unroll=unroll), 1)

    def extrapolated(once: dict, twice: dict) -> float:
        """`plan`'s correction applied to a pair of programs (one layer, and two)."""
        result = dict(once)
        plan._cost_as_unrolled(result, once, once, twice, depth)
        return result["estimated_seconds"]

    scan = plan.measure(program.lowered, chips)
    once, twice = (plan.measure(lowered, 1)
                   for lowered in plan.first_layers(model, program, chips, one_chip))
    estimate = extrapolated(once, twice)
    two_layer_estimate = extrapolated(layers(two, 1), layers(two, 2))
    unrolled_by_two = extrapolated(scanned(1), scanned(2))
    unrolled = layers(whole, depth)
    return {"operation": operation, "tokens": tokens, "batch_per_chip": program.batch,
            "depth": depth,
            "unrolled_seconds": unrolled["estimated_seconds"],
            "plan_seconds": estimate,
            "plan_over_unrolled": estimate / unrolled["estimated_seconds"],
            "two_layer_weights_seconds": two_layer_estimate,
            "two_layer_weights_over_unrolled":
                two_layer_estimate / unrolled["estimated_seconds"],
            "depth_times_one_layer_over_unrolled":
                depth * once["estimated_seconds"] / unrolled["estimated_seconds"],
            "depth_times_scan_seconds": depth * scan["estimated_seconds"],
            "depth_times_scan_over_unrolled":
                depth * scan["estimated_seconds"] / unrolled["estimated_seconds"],
            "scan_unrolled_by_two_seconds": unrolled_by_two,
            "scan_unrolled_by_two_over_unrolled": unrolled_by_two / unrolled["estimated_seconds"],
            "compile_seconds": {"unrolled": unrolled["compile_seconds"],
                                "plan_layers": once["compile_seconds"]
                                + twice["compile_seconds"],
                                "scan": scan["compile_seconds"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="v5e-8", choices=sorted(plan.TARGETS))
    parser.add_argument("--encode", type=_tokens, default=[16, 100, 252])
    parser.add_argument("--decode", type=_tokens, default=[16, 252, 1512])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    config = load_config(RELEASED_CONFIG)
    target = plan.TARGETS[args.target]
    devices, model, runner = plan._slice(config, target, "bfloat16")
    rows = []
    for operation, buckets in (("encode", args.encode), ("decode", args.decode)):
        for tokens in buckets:
            rows.append(measure_bucket(config, runner, devices, model, operation, tokens))
            print(json.dumps(rows[-1]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"target": target.topology, "dtype": "bfloat16", "rows": rows}, f,
                      indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
