"""Plan extraction and decoding on a TPU slice before renting it, from this CPU.

    python -m losatok_jax.plan --target v5e-8 --dtype bfloat16 [--json plan.json] [--hours 1e6]

The TPU compiler (libtpu, the `tpu` extra) runs on any x86-64 Linux machine and compiles for the
compile-only devices of a real slice (`jax.experimental.topologies`). This tool builds a
`MeshRunner` over all the slice's chips on abstract parameters (no weights are needed or made),
lowers exactly the programs `extract` (operation "encode") and `decode`/`reconstruct` ("decode")
run for each length bucket at the planned batch, compiles each for the TPU, and reports per
operation and bucket, per chip:
- HBM: the parameters (held once) plus the largest program's inputs, temporaries and outputs,
  against the chip's capacity; a bucket over `--hbm_fraction` of it is one `error:` line;
- FLOPs and bytes accessed per audio-second, and the collectives in the compiled programs;
- the compiler's time estimate as × realtime per chip and as a fraction of the chip's bfloat16
  peak. The estimate is corrected twice: each `ConcatBitcast` custom call carries a −1 s
  sentinel, removed; a scan's body is costed once, so each stack adds (depth − 1) times one
  layer compiled alone with the same per-chip shapes (FLOPs exact, as an unrolled stack's; the
  time errs high, since a layer compiled alone also pays for what a scan overlaps);
- compile time.
With `--hours H` (or `--input DIR`, which sums the corpus' durations) it projects chip-hours and
wall time for the slice at the slowest encode bucket. Float32 times are not modelled by the
compiler (it costs float32 matmuls as bfloat16 ones); plan with `--dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

from losatok_jax import _cli, _model_source
from losatok_jax.config import RELEASED_CONFIG, SAMPLE_RATE
from losatok_jax.errors import LosatokError, require
from losatok_jax.model import COMPUTE_DTYPES


class PlanError(LosatokError):
    """A target, option or program that cannot be planned (or does not fit)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice: its topology, chips per host, and each chip's HBM and bfloat16 peak."""

    topology: str
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int
    bf16_flops: float


_V5E = dict(hbm_bytes=16 << 30, bf16_flops=197e12)
_V5P = dict(hbm_bytes=95 << 30, bf16_flops=459e12)
_V6E = dict(hbm_bytes=32 << 30, bf16_flops=918e12)
TARGETS = {
    "v5e-8": Target("v5e:2x4", (2, 4, 1), **_V5E),
    "v5e-16": Target("v5e:4x4", (2, 2, 1), **_V5E),  # 4 hosts of 4 chips
    "v5p-8": Target("v5p:2x2x1", (2, 2, 1), **_V5P),  # 4 chips (v5p counts TensorCores)
    "v6e-8": Target("v6e:2x4", (2, 4, 1), **_V6E),
}
TARGETS.update({t.topology: t for t in list(TARGETS.values())})  # "v5e:2x4" works too
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(?:-start)?\(")
SENTINEL_SECONDS = 1.0  # each ConcatBitcast custom call adds -1 s to `optimal_seconds`


def compile_only_devices(target: Target) -> list:
    """The slice's chips as compile-only devices (libtpu must be installed)."""
    require("libtpu", "tpu", "compiling for TPUs")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # quiets libtpu's probing
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name="default",
            chips_per_host_bounds=target.chips_per_host, num_slices=1).devices)
    except RuntimeError as e:
        raise PlanError(f"the TPU compiler cannot describe {target.topology}: "
                        f"{str(e).splitlines()[0]}") from None


def _input_bytes(lowered, chips: int) -> int:
    """Bytes per chip of a program's inputs other than the model (rows are split over chips)."""
    import jax
    import numpy as np

    (args, kwargs) = lowered.args_info
    leaves = [leaf for leaf in jax.tree.leaves((args[1:], kwargs)) if hasattr(leaf, "shape")]
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves) // chips


def measure(lowered, chips: int) -> dict:
    """One program compiled: memory, cost (sentinels removed) and collectives, per chip."""
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    sentinels = text.count('custom_call_target="ConcatBitcast"')
    return {"compile_seconds": seconds,
            "argument_bytes": memory.argument_size_in_bytes,
            "input_bytes": _input_bytes(lowered, chips),
            "temp_bytes": memory.temp_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "estimated_seconds": float(cost.get("optimal_seconds", 0.0))
            + SENTINEL_SECONDS * sentinels,
            "collectives": dict(collections.Counter(COLLECTIVE.findall(text)))}


def extraction_buckets(batch_size: int, num_tokens=None):
    """The buckets `extract --batch_size B --buckets ...` uses."""
    from losatok_jax._batching import DEFAULT_BUCKETS, Buckets

    return Buckets(batch_sizes=tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < batch_size)
                   + (batch_size,), num_tokens=tuple(num_tokens or DEFAULT_BUCKETS.num_tokens))


def plan(config, target: Target, *, dtype: str = "bfloat16", batch_size: int = 8,
         num_tokens=None, operations=("encode", "decode"), progress=None) -> dict:
    """Compiles every program of `operations` at the planned batch of each bucket (the largest
    batch bucket up to `batch_size` that the token budget allows, as `extract` batches) for
    `target`, and returns the report (see the module's docstring); `progress(message)` hears of
    each program compiled."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from losatok_jax import _programs, checkpoint
    from losatok_jax._execution import program_plan
    from losatok_jax.model import Losatok
    from losatok_jax.runners import DATA_AXIS, MeshRunner, stacked_weights

    devices = compile_only_devices(target)
    chips = len(devices)
    model = jax.eval_shape(lambda p: Losatok(p, config).astype(dtype),
                           checkpoint.abstract_params(config))
    runner = MeshRunner(model, mesh=Mesh(np.array(devices), (DATA_AXIS,)))
    buckets = extraction_buckets(batch_size, num_tokens)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))
    depth = {"semantic": config.semantic.depth, "decoder": config.decoder_depth}
    stack_of = {"encode": "semantic", "decode": "decoder"}
    one_chip = jax.sharding.SingleDeviceSharding(devices[0])
    entries: dict[tuple[str, int], dict] = {}
    for program in program_plan(runner, buckets, keys=("z",),
                                decode_too="decode" in operations):
        if program.operation not in operations \
                or program.batch != buckets.max_batch(program.tokens):
            continue
        result = measure(program.lowered, chips)
        if program.stage == "stack":  # the scan body counts once: add the other layers
            stack = stack_of[program.operation]
            (args, _) = program.lowered.args_info
            layer = jax.tree.map(
                lambda w: jax.ShapeDtypeStruct(w.shape[1:], w.dtype, sharding=one_chip),
                stacked_weights(model, stack))
            x, mask = (jax.ShapeDtypeStruct((a.shape[0] // chips, *a.shape[1:]), a.dtype,
                                            sharding=one_chip) for a in args[1:3])
            single = measure(_programs.apply_layer.lower(
                layer, x, mask, config=config, dtype=model.dtype, stack=stack, max_rows=None), 1)
            for key in ("flops", "bytes_accessed", "estimated_seconds"):
                result[key] += (depth[stack] - 1) * single[key]
            result["compile_seconds"] += single["compile_seconds"]
        entry = entries.setdefault((program.operation, program.tokens), {
            "operation": program.operation, "tokens": program.tokens,
            "batch_per_chip": program.batch, "programs": []})
        entry["programs"].append({"stage": program.stage, **result})
        if progress is not None:
            progress(f"compiled {program.operation} {program.tokens} tokens {program.stage} "
                     f"in {result['compile_seconds']:.1f} s")
    tokens_per_second = SAMPLE_RATE / config.samples_per_token
    rows = [_summarise(entry, param_bytes, tokens_per_second, target)
            for _, entry in sorted(entries.items(), key=lambda item: (item[0][0] != "encode",
                                                                       item[0][1]))]
    return {"target": target.topology, "chips": chips,
            "hosts": len({d.process_index for d in devices}), "chip": devices[0].device_kind,
            "hbm_bytes_per_chip_capacity": target.hbm_bytes,
            "bf16_flops_per_chip": target.bf16_flops, "dtype": dtype,
            "param_bytes_per_chip": param_bytes, "programs": rows}


def _summarise(entry: dict, param_bytes: int, tokens_per_second: float, target: Target) -> dict:
    """One operation and bucket: its programs summed (HBM: the largest program's)."""
    stages = entry.pop("programs")
    audio_seconds = entry["batch_per_chip"] * entry["tokens"] / tokens_per_second
    flops = sum(p["flops"] for p in stages)
    seconds = sum(p["estimated_seconds"] for p in stages)
    collectives = collections.Counter()
    for p in stages:
        collectives.update(p["collectives"])
    return {**entry,
            "audio_seconds_per_chip": audio_seconds,
            "hbm_bytes_per_chip": param_bytes + max(p["input_bytes"] + p["temp_bytes"]
                                                    + p["output_bytes"] for p in stages),
            "flops_per_audio_second": flops / audio_seconds,
            "bytes_accessed_per_audio_second": sum(p["bytes_accessed"] for p in stages)
            / audio_seconds,
            "collectives": dict(collectives),
            "estimated_seconds": seconds,
            "realtime_per_chip": audio_seconds / seconds if seconds > 0 else None,
            "estimated_fraction_of_peak": flops / seconds / target.bf16_flops
            if seconds > 0 else None,
            "compile_seconds": sum(p["compile_seconds"] for p in stages),
            "stages": stages}


def projection(report: dict, hours: float) -> dict:
    """Chip-hours and wall time to encode `hours` of audio on the slice, at the slowest
    encode bucket's estimated speed (the compiler's estimate; hosts assumed to keep up)."""
    encodes = [row for row in report["programs"] if row["operation"] == "encode"
               and row["realtime_per_chip"]]
    if not encodes:
        return {}
    realtime = min(row["realtime_per_chip"] for row in encodes)
    chip_hours = hours / realtime
    return {"audio_hours": hours, "realtime_per_chip": realtime, "chip_hours": chip_hours,
            "wall_hours": chip_hours / report["chips"]}


def table(report: dict) -> str:
    lines = [f"{report['target']}: {report['chips']} chips ({report['chip']}) on "
             f"{report['hosts']} host(s), {report['dtype']}, parameters "
             f"{report['param_bytes_per_chip'] / 1e9:.2f} GB per chip",
             "| operation | tokens | batch/chip | HBM/chip (GB) | GFLOP/audio-s | collectives "
             "| x realtime/chip | of bf16 peak | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["programs"]:
        realtime = row["realtime_per_chip"]
        fraction = row["estimated_fraction_of_peak"]
        lines.append(
            f"| {row['operation']} | {row['tokens']} | {row['batch_per_chip']} | "
            f"{row['hbm_bytes_per_chip'] / 1e9:.2f} | {row['flops_per_audio_second'] / 1e9:.1f} | "
            f"{sum(row['collectives'].values())} | "
            f"{'-' if realtime is None else f'{realtime:,.0f}'} | "
            f"{'-' if fraction is None else f'{fraction:.0%}'} | {row['compile_seconds']:.0f} |")
    if "projection" in report:
        p = report["projection"]
        lines.append(f"{p['audio_hours']:,.0f} h of audio: {p['chip_hours']:,.1f} chip-hours, "
                     f"{p['wall_hours']:,.2f} h on the slice (slowest encode bucket, "
                     f"{p['realtime_per_chip']:,.0f}x realtime per chip)")
    return "\n".join(lines)


def _corpus_hours(source: str) -> float:
    """The summed duration of the audio a folder or manifest lists (read from the headers)."""
    import av

    seconds = 0.0
    for entry in _cli.list_inputs(source):
        try:
            with av.open(entry.path, metadata_errors="ignore") as container:
                seconds += (container.duration or 0) / av.time_base
        except (av.FFmpegError, OSError, ValueError):
            continue
    return seconds / 3600


def _parser() -> argparse.ArgumentParser:
    parser = _cli.Parser("plan", __doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True,
                        help=f"TPU slice: {', '.join(sorted(TARGETS))}")
    parser.add_argument("--model_path", default=None, help=_model_source.MODEL_HELP
                        + "; only its config is read")
    parser.add_argument("--config_path", default=None, help=_model_source.CONFIG_HELP)
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                        help="compute dtype (the compiler's times model bfloat16 only)")
    parser.add_argument("--batch_size", type=_cli.positive(int, "whole number"), default=8,
                        help="clips per chip per batch, as extract's --batch_size (default 8)")
    parser.add_argument("--buckets", type=_cli.positive_list, default=None,
                        help="length buckets in tokens, as extract's --buckets")
    parser.add_argument("--operations", default="encode,decode",
                        help="comma-separated: encode (extract), decode (decode, reconstruct)")
    parser.add_argument("--hbm_fraction", type=_cli.positive(float, "fraction"), default=0.9,
                        help="the share of a chip's HBM a program may use (default 0.9)")
    parser.add_argument("--hours", type=_cli.positive(float, "number of hours"), default=None,
                        help="project chip-hours and wall time for H hours of audio")
    parser.add_argument("--input", default=None,
                        help="project for the audio this folder or manifest lists")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the report")
    return parser


def _run(args: argparse.Namespace) -> None:
    from losatok_jax import _files, checkpoint
    from losatok_jax.config import load_config

    target = TARGETS.get(args.target)
    if target is None:
        raise PlanError(f"--target {args.target}: choose from {', '.join(sorted(TARGETS))}")
    operations = tuple(args.operations.split(","))
    if not operations or set(operations) - {"encode", "decode"}:
        raise PlanError(f"--operations {args.operations}: choose from encode, decode")
    hours = args.hours if args.input is None else _corpus_hours(args.input)
    if args.json is not None:
        _files.check_apart(args.json, "--json", [("--input", args.input),
                                                 ("--model_path", args.model_path),
                                                 ("--config_path", args.config_path)])
        _files.check_writable(args.json)
    if args.model_path is not None and not _model_source.is_upstream_checkpoint(args.model_path):
        _model_source.check_exists(args.model_path)
        config = load_config(os.path.join(args.model_path, checkpoint.CONFIG_FILE))
    else:
        config = load_config(args.config_path or RELEASED_CONFIG)
    require("libtpu", "tpu", "compiling for TPUs")
    line = _cli.StatusLine()
    report = plan(config, target, dtype=args.dtype, batch_size=args.batch_size,
                  num_tokens=args.buckets, operations=operations, progress=line.show)
    line.end()
    if hours:
        report["projection"] = projection(report, hours)
    if args.json is not None:
        _files.write_atomically(args.json, json.dumps(report, indent=1) + "\n")
    print(table(report))
    budget = args.hbm_fraction * target.hbm_bytes
    over = [row for row in report["programs"] if row["hbm_bytes_per_chip"] > budget]
    if over:
        row = max(over, key=lambda r: r["hbm_bytes_per_chip"])
        raise PlanError(f"{row['operation']} at {row['tokens']} tokens needs "
                        f"{row['hbm_bytes_per_chip'] / 1e9:.2f} GB per chip, over "
                        f"{args.hbm_fraction:.0%} of {target.hbm_bytes / 2**30:.0f} GiB: lower "
                        "--batch_size")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
