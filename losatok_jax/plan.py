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
- FLOPs and bytes accessed per audio-second (FLOPs also against the model's analytic count at
  the bucket's length: padding and the front end's transforms make the difference), and the
  collectives in the compiled programs;
- the compiler's time estimate as × realtime per chip and as a fraction of the chip's bfloat16
  peak. The estimate is corrected twice: each `ConcatBitcast` custom call carries a −1 s
  sentinel, removed; a scan's body is costed once, so a stack is costed as an unrolled one
  would be, from its first layer, and its first two, compiled straight-line on the whole
  stack's weights with the same per-chip shapes: one layer's cost plus (depth − 1) times what
  the second adds (the compiler's cost grows by the same amount with every layer, so this is
  a fully unrolled stack's estimate, which takes minutes per bucket to compile);
- compile time (programs compile on `--workers` threads, which share the cores; as a
  command, under jemalloc where the system has it: `_allocator`).
With `--hours H` it projects chip-hours and wall time for the slice (clips of a semantic chunk
or longer, and the slowest bucket's worst case); with `--input DIR` (a folder or manifest), for
that corpus, each clip's windows at their own buckets. `--batch_plan FILE` also finds the
largest batch per encode bucket that fits and writes it for `extract --batch_plan`;
`--operations train` adds one `train` step (memory and collectives). Float32 times are
understated: the compiler costs a full-precision float32 product as one bfloat16 pass (only the
spectral products and linear layers, spelled out as their six passes, are costed in full); plan
with `--dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from losatok_jax import _allocator, _batching, _cli, _model_source, _programs
from losatok_jax._batching import extraction_buckets
from losatok_jax.config import RELEASED_CONFIG, SAMPLE_RATE
from losatok_jax.errors import LosatokError, Note, require
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
COMPILE_THREADS_FLAG = "xla_jf_internal_num_threads"  # libtpu's code-generation threads


def encode_flops(config, num_samples: int) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add) that encoding one clip needs, as upstream
    computes it (no padding). STFTs and elementwise work are left out (< 1%)."""
    s = config.semantic
    tokens = config.num_tokens(num_samples)
    frames = 1 + num_samples // config.hop_length
    e, d = config.embed_dim, config.decoder_dim
    flops = 2 * frames * (s.n_fft // 2 + 1) * s.n_mels  # semantic mel matmul
    flops += 2 * frames * (config.n_fft_acoustic // 2 + 1) * config.n_mels_patch  # acoustic mel
    flops += 2 * tokens * (s.n_mels * s.frames_per_token) * e  # semantic patch conv
    full, last = divmod(tokens, s.chunk_tokens)
    for length, count in ((s.chunk_tokens, full), (last, 1 if last else 0)):
        per_block = 2 * length * e * (3 * e + e + 2 * s.mlp_dim) + 4 * length * length * e
        flops += count * s.depth * per_block
    flops += 2 * tokens * (e * config.sembo_hidden_dim + config.sembo_hidden_dim * d)  # SemBo
    flops += 2 * tokens * (config.n_mels_patch * config.frames_per_token) * e  # acoustic patch
    flops += 2 * tokens * (e * d + 2 * d * d)  # fc_a, fc_mu, fc_logvar
    return float(flops)


def decode_flops(config, tokens: int) -> float:
    """Matmul and convolution FLOPs of decoding `tokens` latents (the irfft left out)."""
    frames = tokens * config.upsample_tokens
    e, c, i = config.embed_dim, config.decoder_embed_dim, config.decoder_intermediate_size
    flops = 2 * frames * config.decoder_dim * e  # ConvTranspose1d
    flops += 2 * frames * e * c * 7  # embed conv
    flops += config.decoder_depth * 2 * frames * (c * 7 + 2 * c * i)  # ConvNeXt blocks
    flops += 2 * frames * c * (config.istft_n_fft + 2)  # ISTFT head projection
    return float(flops)


def share_cores(workers: int) -> None:
    """Gives each of `workers` compiles running at once its share of the cores: the compiler's
    code generation runs on a thread pool that otherwise takes every core, and two compiles that
    each do so run slower together than two that split them. libtpu reads this when it loads,
    once per process; a thread count already in $LIBTPU_INIT_ARGS is kept."""
    flags = os.environ.get("LIBTPU_INIT_ARGS", "")
    if COMPILE_THREADS_FLAG not in flags:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["LIBTPU_INIT_ARGS"] = f"{flags} --{COMPILE_THREADS_FLAG}={threads}".strip()


def compile_only_devices(target: Target, workers: int = 1) -> list:
    """The slice's chips as compile-only devices (libtpu must be installed), for compiling
    `workers` programs at a time (`share_cores`)."""
    require("libtpu", "tpu", "compiling for TPUs")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # quiets libtpu's probing
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    share_cores(workers)
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
            "alias_bytes": memory.alias_size_in_bytes,
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "estimated_seconds": float(cost.get("optimal_seconds", 0.0))
            + SENTINEL_SECONDS * sentinels,
            "collectives": dict(collections.Counter(COLLECTIVE.findall(text)))}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "stack", "count"))
def consecutive_layers(weights, x, mask, *, config, dtype: str, stack: str, count: int):
    """The first `count` layers of `LAYER_STACKS[stack]` unrolled, each sliced from `weights`
    (the whole stack's, stacked per layer): what an unrolled stack's first layers cost."""
    for i in range(count):
        x = _programs.apply_layer(jax.tree.map(lambda w, i=i: w[i], weights), x, mask,
                                  config=config, dtype=dtype, stack=stack, max_rows=None)
    return x


def _slice(config, target: Target, dtype: str, workers: int = 1):
    """The target's compile-only chips (for `workers` compiles at a time), the model on abstract
    parameters, and a `MeshRunner` over every chip."""
    import numpy as np
    from jax.sharding import Mesh

    from losatok_jax import checkpoint
    from losatok_jax.model import Losatok
    from losatok_jax.runners import DATA_AXIS, MeshRunner

    devices = compile_only_devices(target, workers)
    model = jax.eval_shape(lambda p: Losatok(p, config).astype(dtype),
                           checkpoint.abstract_params(config))
    return devices, model, MeshRunner(model, mesh=Mesh(np.array(devices), (DATA_AXIS,)))


def _cost_as_unrolled(result: dict, base: dict, once: dict, twice: dict, depth: int) -> None:
    """Sets `result`'s cost to `base` plus (depth − 1) times what a second layer adds to one
    (`once`, `twice`: the layer compiled once and twice in a row): a scan's body counts once."""
    for key in ("flops", "bytes_accessed", "estimated_seconds"):
        result[key] = base[key] + (depth - 1) * (twice[key] - once[key])
    result["compile_seconds"] += once["compile_seconds"] + twice["compile_seconds"]


def _stack_weights(model, stack: str, sharding):
    """A stack's weights, every layer's as the scan takes them, abstract, on `sharding`. The
    layer programs of the estimate slice them as the scan does: given only two layers' weights,
    the compiler lays them out otherwise and costs the same layers up to 5.4x higher."""
    from losatok_jax.runners import stacked_weights

    return jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding),
                        stacked_weights(model, stack))


STACK_OF = {"encode": "semantic", "decode": "decoder"}  # the layer stack each operation runs


def stack_depth(model, stack: str) -> int:
    """The stack's layer count: the leading axis of its stacked weights."""
    from losatok_jax.runners import stacked_weights

    return jax.tree.leaves(stacked_weights(model, stack))[0].shape[0]


def chip_rows(program, chips: int, chip):
    """A planned stack `program`'s inputs (x, mask) as one chip's rows, on `chip`."""
    (args, _) = program.lowered.args_info
    return tuple(jax.ShapeDtypeStruct((a.shape[0] // chips, *a.shape[1:]), a.dtype,
                                      sharding=chip) for a in args[1:3])


def first_layers(model, program, chips: int, chip) -> list:
    """The estimate's programs for a planned stack `program`: its first layer, and its first
    two, unrolled on one chip's rows (`chip`, a single-device sharding)."""
    stack = STACK_OF[program.operation]
    weights = _stack_weights(model, stack, chip)
    x, mask = chip_rows(program, chips, chip)
    return [consecutive_layers.lower(weights, x, mask, config=model.config, dtype=model.dtype,
                                     stack=stack, count=count) for count in (1, 2)]


def _param_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))


def plan(config, target: Target, *, dtype: str = "bfloat16", batch_size: int = 8,
         num_tokens=None, operations=("encode", "decode"), workers: int = 2,
         progress=None) -> dict:
    """Compiles every program of `operations` at the planned batch of each bucket (the largest
    batch bucket up to `batch_size` that the token budget allows, as `extract` batches) for
    `target` on `workers` threads, and returns the report (see the module's docstring);
    `progress(message)` hears of each program compiled."""
    from losatok_jax._execution import program_plan

    devices, model, runner = _slice(config, target, dtype, workers)
    chips = len(devices)
    buckets = extraction_buckets(batch_size, num_tokens)
    one_chip = jax.sharding.SingleDeviceSharding(devices[0])

    planned = program_plan(runner, buckets, keys=("z",), encode_too="encode" in operations,
                           decode_too="decode" in operations, largest_batch_only=True)
    # A generator: the pool starts compiling the first programs while the rest are lowered.
    jobs = ((program, [program.lowered] + (first_layers(model, program, chips, one_chip)
                                          if program.stage == "stack" else []))
            for program in planned)

    def compile_job(job):
        program, lowered = job
        result, *layers = [measure(lowering, 1 if i else chips)
                           for i, lowering in enumerate(lowered)]
        if layers:  # the scan's body counts once: cost the stack as if unrolled
            once, twice = layers
            _cost_as_unrolled(result, once, once, twice,
                              stack_depth(model, STACK_OF[program.operation]))
        if progress is not None:
            progress(f"compiled {program.operation} {program.tokens} tokens {program.stage} "
                     f"in {result['compile_seconds']:.1f} s")
        return program, result

    entries: dict[tuple[str, int], dict] = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for program, result in pool.map(compile_job, jobs):
            entry = entries.setdefault((program.operation, program.tokens), {
                "operation": program.operation, "tokens": program.tokens,
                "batch_per_chip": program.batch, "programs": []})
            entry["programs"].append({"stage": program.stage, **result})
    tokens_per_second = SAMPLE_RATE / config.samples_per_token
    for (operation, tokens), entry in entries.items():
        flops = (encode_flops(config, tokens * config.samples_per_token)
                 if operation == "encode" else decode_flops(config, tokens))
        entry["analytic_flops_per_audio_second"] = flops * tokens_per_second / tokens
    param_bytes = _param_bytes(model)
    rows = [_summarise(entry, param_bytes, tokens_per_second, target)
            for _, entry in sorted(entries.items(), key=lambda item: (item[0][0] != "encode",
                                                                       item[0][1]))]
    return {"target": target.topology, "chips": chips,
            "hosts": len({d.process_index for d in devices}), "chip": devices[0].device_kind,
            "hbm_bytes_per_chip_capacity": target.hbm_bytes,
            "bf16_flops_per_chip": target.bf16_flops, "dtype": dtype,
            "param_bytes_per_chip": param_bytes, "allocator": _allocator.in_use(),
            "programs": rows}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "stack", "count"))
def consecutive_layers_gradient(weights, x, mask, *, config, dtype: str, stack: str, count: int):
    """The gradient of `consecutive_layers` with respect to its layers' weights and its input:
    what one layer, and two, cost in a training step's backward pass."""
    def total(first, x):
        return jnp.sum(consecutive_layers(first, x, mask, config=config, dtype=dtype,
                                          stack=stack, count=count).astype(jnp.float32))

    return jax.grad(total, argnums=(0, 1))(jax.tree.map(lambda w: w[:count], weights), x)


TRAIN_BATCH, TRAIN_SECONDS = 16, 2.0  # train's --batch_size and --segment_seconds defaults


def plan_train(config, target: Target, *, batch_size: int = TRAIN_BATCH,
               segment_seconds: float = TRAIN_SECONDS, workers: int = 2) -> dict:
    """One `train` step (every group trainable, float32, `batch_size` crops over the slice,
    at least one per chip) compiled for `target`: the report's row for operation "train".

    Its scans (forward and backward) are costed once each, so each stack adds (depth − 1) times
    what a second layer adds to one layer's gradient, compiled on one chip's rows."""
    from jax.sharding import NamedSharding, PartitionSpec

    from losatok_jax import training
    from losatok_jax.runners import DATA_AXIS

    devices, model, runner = _slice(config, target, "float32", workers)
    chips = len(devices)
    batch = -(-max(batch_size, chips) // chips) * chips
    mesh = runner.mesh
    train_config = training.TrainConfig()
    replicated = NamedSharding(mesh, PartitionSpec())
    state, frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda m: training.init_train_state(m, train_config, 0), model))
    samples = training.segment_samples(segment_seconds, config)
    crops = jax.ShapeDtypeStruct((1, batch, samples), jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)))
    step = training.make_train_step(config, train_config, mesh).lower(state, frozen, crops)

    rows, tokens = batch // chips, config.num_tokens(samples)
    one_chip = jax.sharding.SingleDeviceSharding(devices[0])
    chunk = min(config.semantic.chunk_tokens, tokens)
    frames = tokens * config.upsample_tokens
    inputs = {"semantic": ((rows * -(-tokens // chunk), chunk, config.semantic.embed_dim),
                           (rows * -(-tokens // chunk), chunk), jnp.bool_),
              "decoder": ((rows, frames, config.decoder_embed_dim), (rows, frames, 1),
                          jnp.float32)}
    lowered = [step]
    for stack, (x_shape, mask_shape, mask_dtype) in inputs.items():
        weights = _stack_weights(model, stack, one_chip)
        x = jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=one_chip)
        mask = jax.ShapeDtypeStruct(mask_shape, mask_dtype, sharding=one_chip)
        lowered += [consecutive_layers_gradient.lower(weights, x, mask, config=config,
                                                      dtype="float32", stack=stack, count=count)
                    for count in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        result, *layers = pool.map(lambda lowering: measure(lowering, chips), lowered)
    for stack, once, twice in zip(inputs, layers[0::2], layers[1::2]):
        _cost_as_unrolled(result, dict(result), once, twice, stack_depth(model, stack))
    audio_seconds = rows * samples / SAMPLE_RATE
    return {"operation": "train", "tokens": tokens, "batch_per_chip": rows,
            "audio_seconds_per_chip": audio_seconds,
            "hbm_bytes_per_chip": result["argument_bytes"] + result["temp_bytes"]
            + result["output_bytes"] - result["alias_bytes"],
            "flops_per_audio_second": result["flops"] / audio_seconds,
            "bytes_accessed_per_audio_second": result["bytes_accessed"] / audio_seconds,
            "collectives": result["collectives"],
            # Training computes in float32, whose matmul speed the compiler does not model.
            "estimated_seconds": None, "realtime_per_chip": None,
            "estimated_fraction_of_peak": None,
            "compile_seconds": result["compile_seconds"], "stages": [{"stage": "step", **result}]}


def largest_batches(config, target: Target, report: dict, *, budget_bytes: float,
                    limit: int = 256, workers: int = 2, progress=None) -> dict[int, dict]:
    """For each encode bucket of `report`, the largest batch per chip (a power of two up to
    `limit`) whose programs need at most `budget_bytes` of HBM per chip, and that HBM.

    Memory grows about linearly with the batch: the report's batch predicts the largest that
    fits, which is then compiled; the batch halves while the compiler finds it too large, and
    doubles while it fits with room for twice the rows."""
    from losatok_jax._execution import program_plan

    devices, model, runner = _slice(config, target, report["dtype"], workers)
    params = _param_bytes(model)

    def hbm(tokens: int, batch: int) -> float:
        buckets = _batching.Buckets(batch_sizes=(batch,), num_tokens=(tokens,),
                                    max_batch_tokens=batch * tokens)
        lowered = [p.lowered for p in program_plan(runner, buckets, keys=("z",), decode_too=False)
                   if p.tokens == tokens]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            stages = list(pool.map(lambda lowering: measure(lowering, len(devices)), lowered))
        if progress is not None:
            progress(f"compiled encode {tokens} tokens at batch {batch}")
        return _hbm_per_chip(stages, params)

    found = {}
    for row in (r for r in report["programs"] if r["operation"] == "encode"):
        known = {row["batch_per_chip"]: row["hbm_bytes_per_chip"]}
        per_row = (row["hbm_bytes_per_chip"] - params) / row["batch_per_chip"]
        candidates = [b for b in _batching.POWERS_OF_TWO if b <= limit]
        batch = max([b for b in candidates if params + b * per_row <= budget_bytes]
                    or [candidates[0]])
        while True:
            if batch not in known:
                known[batch] = hbm(row["tokens"], batch)
            fits = known[batch] <= budget_bytes
            if fits and 2 * batch <= limit and 2 * batch not in known \
                    and params + 2 * (known[batch] - params) <= budget_bytes:
                batch *= 2
            elif not fits and batch > 1:
                batch //= 2
            else:
                break
        fitting = [b for b, used in known.items() if used <= budget_bytes]
        if fitting:
            found[row["tokens"]] = {"batch_per_chip": max(fitting),
                                    "hbm_bytes_per_chip": known[max(fitting)]}
    return found


def _hbm_per_chip(stages: list[dict], param_bytes: int) -> int:
    """The parameters, held once, plus the largest stage's inputs, temporaries and outputs."""
    return param_bytes + max(p["input_bytes"] + p["temp_bytes"] + p["output_bytes"]
                             for p in stages)


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
            "hbm_bytes_per_chip": _hbm_per_chip(stages, param_bytes),
            "flops_per_audio_second": flops / audio_seconds,
            "compiled_over_analytic_flops": flops / audio_seconds
            / entry["analytic_flops_per_audio_second"],
            "bytes_accessed_per_audio_second": sum(p["bytes_accessed"] for p in stages)
            / audio_seconds,
            "collectives": dict(collectives),
            "estimated_seconds": seconds,
            "realtime_per_chip": audio_seconds / seconds if seconds > 0 else None,
            "estimated_fraction_of_peak": flops / seconds / target.bf16_flops
            if seconds > 0 else None,
            "compile_seconds": sum(p["compile_seconds"] for p in stages),
            "stages": stages}


def projection(report: dict, hours: float | None = None,
               durations: list[float] | None = None) -> dict:
    """Chip-hours and wall time to encode audio on the slice at the compiler's estimated speeds
    (hosts assumed to keep up). For a corpus (`durations`, seconds per clip), each clip's
    windows are costed at their own buckets, padding included; for `hours` alone, at the
    semantic-chunk bucket (clips of a chunk or longer: most of their audio runs there) and, as
    the worst case, at the slowest bucket."""
    encodes = {row["tokens"]: row for row in report["programs"]
               if row["operation"] == "encode" and row["realtime_per_chip"]}
    if not encodes:
        return {}
    chunk = max(encodes)
    tokens_per_second = encodes[chunk]["tokens"] * encodes[chunk]["batch_per_chip"] / \
        encodes[chunk]["audio_seconds_per_chip"]

    def chip_seconds(tokens: int) -> float:
        """One window of `tokens` tokens: its bucket's audio over its bucket's speed."""
        bucket = min(t for t in encodes if t >= tokens)
        return bucket / tokens_per_second / encodes[bucket]["realtime_per_chip"]

    result = {"chips": report["chips"]}
    if durations is not None:
        hours = sum(durations) / 3600
        total = 0.0
        for seconds in durations:
            full, rest = divmod(max(1, int(seconds * tokens_per_second)), chunk)
            total += full * chip_seconds(chunk) + (chip_seconds(rest) if rest else 0.0)
        result["corpus"] = {"clips": len(durations), "chip_hours": total / 3600}
    cases = {"chunk_bucket": encodes[chunk]["realtime_per_chip"],
             "slowest_bucket": min(row["realtime_per_chip"] for row in encodes.values())}
    for case, realtime in cases.items():
        result[case] = {"realtime_per_chip": realtime, "chip_hours": hours / realtime}
    for case in ("corpus", "chunk_bucket", "slowest_bucket"):
        if case in result:
            result[case]["wall_hours"] = result[case]["chip_hours"] / report["chips"]
    return {"audio_hours": hours, **result}


def table(report: dict) -> str:
    lines = [f"{report['target']}: {report['chips']} chips ({report['chip']}) on "
             f"{report['hosts']} host(s), {report['dtype']}, parameters "
             f"{report['param_bytes_per_chip'] / 1e9:.2f} GB per chip, compiled with the "
             f"{report['allocator']} allocator",
             "| operation | tokens | batch/chip | HBM/chip (GB) | GFLOP/audio-s (x analytic) "
             "| collectives "
             "| x realtime/chip | of bf16 peak | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["programs"]:
        realtime = row["realtime_per_chip"]
        fraction = row["estimated_fraction_of_peak"]
        versus = row.get("compiled_over_analytic_flops")
        lines.append(
            f"| {row['operation']} | {row['tokens']} | {row['batch_per_chip']} | "
            f"{row['hbm_bytes_per_chip'] / 1e9:.2f} | {row['flops_per_audio_second'] / 1e9:.1f}"
            f"{'' if versus is None else f' ({versus:.2f})'} | "
            f"{sum(row['collectives'].values())} | "
            f"{'-' if realtime is None else f'{realtime:,.0f}'} | "
            f"{'-' if fraction is None else f'{fraction:.0%}'} | {row['compile_seconds']:.0f} |")
    largest = [f"{row['tokens']}: {row['largest_batch']['batch_per_chip']} "
               f"({row['largest_batch']['hbm_bytes_per_chip'] / 1e9:.2f} GB)"
               for row in report["programs"] if "largest_batch" in row]
    if largest:
        lines.append("largest encode batch per chip that fits, by bucket (tokens): "
                     + ", ".join(largest))
    if "projection" in report:
        p = report["projection"]
        cases = {"corpus": "the corpus' clips, each window at its bucket",
                 "chunk_bucket": "clips of a semantic chunk or longer",
                 "slowest_bucket": "all at the slowest bucket"}
        for case, words in cases.items():
            if case in p:
                lines.append(f"{p['audio_hours']:,.1f} h of audio, {words}: "
                             f"{p[case]['chip_hours']:,.1f} chip-hours, "
                             f"{p[case]['wall_hours']:,.2f} h on the slice")
    return "\n".join(lines)


def _corpus_durations(source: str) -> list[float]:
    """Each clip's duration in seconds, as its header gives it, for a folder or manifest."""
    import av

    durations = []
    for entry in _cli.list_inputs(source):
        try:
            with av.open(entry.path, metadata_errors="ignore") as container:
                durations.append((container.duration or 0) / av.time_base)
        except (av.FFmpegError, OSError, ValueError):
            continue
    return durations


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
                        help="comma-separated: encode (extract), decode (decode, reconstruct), "
                             f"train (one step of {TRAIN_BATCH} crops of {TRAIN_SECONDS:g} s, "
                             "train's defaults, float32)")
    parser.add_argument("--hbm_fraction", type=_cli.positive(float, "fraction"), default=0.9,
                        help="the share of a chip's HBM a program may use (default 0.9)")
    parser.add_argument("--hours", type=_cli.positive(float, "number of hours"), default=None,
                        help="project chip-hours and wall time for H hours of audio")
    parser.add_argument("--input", default=None,
                        help="project for the audio this folder or manifest lists")
    parser.add_argument("--workers", type=_cli.positive(int, "whole number"),
                        default=min(4, os.cpu_count() or 1),
                        help="programs compiled at once, which split the cores (default: up "
                             "to 4, one per core)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write the report")
    parser.add_argument("--batch_plan", default=None, metavar="PLAN.json",
                        help="find the largest batch per encode bucket within --hbm_fraction "
                             "and write it where extract --batch_plan reads it (one more "
                             "compile per bucket, or a few)")
    parser.add_argument("--max_batch", type=_cli.positive(int, "whole number"), default=256,
                        help="the largest batch per chip --batch_plan tries (default 256)")
    return parser


def _run(args: argparse.Namespace) -> None:
    from losatok_jax import _files, checkpoint
    from losatok_jax.config import load_config

    target = TARGETS.get(args.target)
    if target is None:
        raise PlanError(f"--target {args.target}: choose from {', '.join(sorted(TARGETS))}")
    operations = tuple(args.operations.split(","))
    if not operations or set(operations) - {"encode", "decode", "train"}:
        raise PlanError(f"--operations {args.operations}: choose from encode, decode, train")
    durations = None if args.input is None else _corpus_durations(args.input)
    if args.batch_plan is not None and "encode" not in operations:
        raise PlanError("--batch_plan plans extraction: --operations must include encode")
    inputs = [("--input", args.input), ("--model_path", args.model_path),
              ("--config_path", args.config_path)]
    for flag, output in (("--json", args.json), ("--batch_plan", args.batch_plan)):
        if output is not None:
            _files.check_apart(output, flag, inputs)
            _files.check_writable(output)
            inputs.append((flag, output))
    if args.model_path is not None and not _model_source.is_upstream_checkpoint(args.model_path):
        _model_source.check_exists(args.model_path)
        config = load_config(os.path.join(args.model_path, checkpoint.CONFIG_FILE))
    else:
        config = load_config(args.config_path or RELEASED_CONFIG)
    require("libtpu", "tpu", "compiling for TPUs")
    if (advice := _allocator.suggestion()) is not None:
        warnings.warn(advice, Note)
    line = _cli.StatusLine()
    report = plan(config, target, dtype=args.dtype, batch_size=args.batch_size,
                  num_tokens=args.buckets, operations=operations, workers=args.workers,
                  progress=line.show)
    if "train" in operations:
        line.show("compiling one train step")
        report["programs"].append(plan_train(config, target, workers=args.workers))
    budget = args.hbm_fraction * target.hbm_bytes
    over = [row for row in report["programs"] if row["hbm_bytes_per_chip"] > budget]
    if args.batch_plan is not None and not over:
        largest = largest_batches(config, target, report, budget_bytes=budget,
                                  limit=args.max_batch, workers=args.workers,
                                  progress=line.show)
        for row in report["programs"]:
            if row["operation"] == "encode":
                row["largest_batch"] = largest[row["tokens"]]
        _batching.write_batch_plan(
            args.batch_plan, {tokens: found["batch_per_chip"] for tokens, found in largest.items()},
            config=config, dtype=args.dtype, target=target.topology, hbm_fraction=args.hbm_fraction)
    line.end()
    if args.hours or durations:
        report["projection"] = projection(report, args.hours, durations)
    if args.json is not None:
        _files.write_atomically(args.json, json.dumps(report, indent=1) + "\n")
    print(table(report))
    if over:
        row = max(over, key=lambda r: r["hbm_bytes_per_chip"])
        raise PlanError(f"{row['operation']} at {row['tokens']} tokens needs "
                        f"{row['hbm_bytes_per_chip'] / 1e9:.2f} GB per chip, over "
                        f"{args.hbm_fraction:.0%} of {target.hbm_bytes / 2**30:.0f} GiB: lower "
                        "--batch_size")
    if args.batch_plan is not None:
        print(f"wrote {args.batch_plan}: the largest batch per chip that fits, per encode bucket")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    return _cli.run_main(_parser(), _run, argv)


def run_as_program() -> int:
    """The console script and `python -m`: `main` under jemalloc where the system has it (its
    compiles run faster there; `_allocator`)."""
    _allocator.rerun_with_jemalloc()
    return main()


if __name__ == "__main__":
    sys.exit(run_as_program())
