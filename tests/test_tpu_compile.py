"""Compiled for a TPU pod on this CPU: the tiny model's encode and decode programs, lowered
through the real runners (`MeshRunner` over both hosts' chips, `PmapRunner` over one host's) on
abstract parameters, compiled by the TPU compiler (libtpu) for the compile-only devices of a
2-host v5e slice. Each program holds no collective and fits a chip's memory with the parameters
held once; a train step's only collectives are all-reduces. The planner's report matches an
independent compile, and its batch plan holds the largest batch that fits.

libtpu runs in a child process (one process at a time may load it, and a test process that
never loads it keeps its CPU-only JAX quiet). `.ci/run` installs it, at the version the installed
jax pins, into the folder named by $LOSATOK_TPU_COMPILER; a libtpu importable here works too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from losatok_jax import _allocator

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "tests" / "data" / "golden" / "tiny_chunk40" / "config.yml"
COMPILER_ENV = "LOSATOK_TPU_COMPILER"


def _compiler_path() -> str | None:
    """Where libtpu is: the folder $LOSATOK_TPU_COMPILER names, or this Python's own."""
    folder = os.environ.get(COMPILER_ENV)
    if folder and (Path(folder) / "libtpu").is_dir():
        return folder
    if importlib.util.find_spec("libtpu") is not None:
        return ""
    return None


COMPILER = _compiler_path()


def _child_environment(**extra: str) -> dict:
    """For a child process that loads libtpu: a CPU-only JAX that finds the compiler, under
    jemalloc where the system has it (as the planner's command runs; its compiles are faster)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra,
           "PYTHONPATH": os.pathsep.join(filter(None, [COMPILER, str(REPO_ROOT)]))}
    env.pop("XLA_FLAGS", None)
    return _allocator.with_jemalloc(env) or env
pytestmark = pytest.mark.skipif(
    COMPILER is None, reason="the TPU compiler is not installed: pip install \"jax[tpu]\" at "
    f"the installed jax's version (or into a folder named by ${COMPILER_ENV}), as .ci/run does")

SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh
    from losatok_jax import Buckets, checkpoint
    from losatok_jax._execution import lower_programs
    from losatok_jax.config import load_config
    from losatok_jax.model import Losatok
    from losatok_jax.runners import MeshRunner, PmapRunner

    devices = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x4", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    config = load_config(sys.argv[1])
    model = jax.eval_shape(lambda p: Losatok(p, config).astype(sys.argv[2]),
                           checkpoint.abstract_params(config))
    mesh = MeshRunner(model, mesh=Mesh(np.array(devices), ("data",)))
    pmap = PmapRunner(model, devices=[d for d in devices if d.process_index == 0])
    buckets = Buckets(batch_sizes=(2,), num_tokens=(32, 64))
    report = {"hosts": len({d.process_index for d in devices}), "chips": len(devices),
              "local": [mesh.num_devices, pmap.num_devices], "kind": devices[0].device_kind,
              "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model))}
    for name, runner in (("mesh", mesh), ("pmap", pmap)):
        report[name] = []
        for lowered in lower_programs(runner, buckets, keys=("z", "mu")):
            compiled = lowered.compile()
            text, memory = compiled.as_text(), compiled.memory_analysis()
            traced = lowered.as_text()
            report[name].append({
                "name": re.search(r"HloModule (\S+)", text).group(1),
                "ffts": traced.count("stablehlo.fft"),
                "scatters": traced.count("stablehlo.scatter"),
                "collectives": re.findall(
                    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                    r"(?:-start)?\(", text),
                "argument_bytes": memory.argument_size_in_bytes,
                "temp_bytes": memory.temp_size_in_bytes,
                "output_bytes": memory.output_size_in_bytes,
                "flops": compiled.cost_analysis().get("flops", 0.0)})
    # One train step over both hosts' chips, as `train` compiles it (a crop of 1 s per chip).
    from jax.sharding import NamedSharding, PartitionSpec
    from losatok_jax import training as train
    mesh_of_all = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh_of_all, PartitionSpec())
    state, frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(lambda m: train.init_train_state(m, train.TrainConfig(), 0),
                       model.astype("float32")))
    crops = jax.ShapeDtypeStruct((1, len(devices), 16000), np.float32, sharding=NamedSharding(
        mesh_of_all, PartitionSpec(None, "data")))
    step = train.make_train_step(config, train.TrainConfig(), mesh_of_all).lower(
        state, frozen, crops).compile()
    report["train_collectives"] = re.findall(
        r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
        step.as_text())
    print("REPORT " + json.dumps(report))
""")


def test_tiny_model_compiles_for_a_two_host_v5e_slice():
    """In float32, the default (the planner's test below compiles bfloat16)."""
    dtype = "float32"
    env = _child_environment(TPU_ACCELERATOR_TYPE="v5litepod-8", TPU_WORKER_HOSTNAMES="localhost")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY_CONFIG), dtype],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT "):])
    assert (report["hosts"], report["chips"], report["local"]) == (2, 8, [4, 4])
    assert report["kind"].startswith("TPU v5")
    # Training's only collectives are all-reduces (the gradients' and the metrics').
    assert report["train_collectives"] and set(report["train_collectives"]) == {"all-reduce"}
    chip_memory = 16 << 30  # v5e
    for runner in ("mesh", "pmap"):  # both lower and compile on compile-only devices
        programs = report[runner]
        # Per batch bucket: the peak pass; stem, stack, finish for each encode length (32 and
        # the tiny model's 10-token chunk) and for each decode length (32, 64).
        assert len(programs) == 1 + 3 * 1 + 3 * 2, [p["name"] for p in programs]
        for program in programs:
            assert program["collectives"] == [], program  # data parallel: nothing crosses chips
            # A TPU computes its STFTs as DFT products and overlap-adds without scattering.
            assert program["ffts"] == 0, program
            if "decode_finish" in program["name"]:
                assert program["scatters"] == 0, program
            assert program["flops"] > 0, program
            used = program["argument_bytes"] + program["temp_bytes"] + program["output_bytes"]
            assert used < chip_memory, program
            # Parameters are held once per chip, not once per row or per device.
            assert program["argument_bytes"] < report["param_bytes"] + (4 << 20), program


PLAN_SCRIPT = textwrap.dedent(r"""
    import dataclasses, json, sys
    import jax
    from jax.experimental import topologies
    from losatok_jax import _programs, checkpoint, plan
    from losatok_jax._layers import compute_dtype
    from losatok_jax._modules import LAYER_STACKS
    from losatok_jax.config import load_config
    from losatok_jax.model import Losatok, full_float32_matmuls
    from losatok_jax.runners import stacked_weights

    config = load_config(sys.argv[1])
    # Deeper stacks than the tiny model's two layers, so that the plan's correction for the
    # scans' other layers is tested: it compiles one layer and two, not the whole stack.
    config = dataclasses.replace(config, decoder_depth=6,
                                 semantic=dataclasses.replace(config.semantic, depth=6))
    report = plan.plan(config, plan.TARGETS["v5e-8"], dtype="bfloat16", batch_size=2,
                       num_tokens=(32, 64))
    # Independently: each stage jitted on one chip with that chip's rows, stacks unrolled.
    device = plan.compile_only_devices(plan.TARGETS["v5e-8"])[0]
    on_chip = jax.sharding.SingleDeviceSharding(device)
    model = jax.eval_shape(lambda p: Losatok(p, config).astype("bfloat16"),
                           checkpoint.abstract_params(config))
    model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip),
                         model)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)

    def unrolled(model, x, mask, stack):
        _, layer = LAYER_STACKS[stack]
        block = layer(model.config, compute_dtype(model.dtype), None)
        weights = stacked_weights(model, stack)
        with full_float32_matmuls():
            for i in range(len(jax.tree.leaves(weights)[0])):
                x = block.apply({"params": jax.tree.map(lambda w: w[i], weights)}, x, mask)[0]
        return x

    def cost(lowered):
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        return (compiled.cost_analysis()["flops"],
                m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)

    import jax.numpy as jnp
    from losatok_jax import _batching
    stack_fn = jax.jit(unrolled, static_argnames="stack")
    found = []
    for row in report["programs"]:
        b, k = row["batch_per_chip"], row["tokens"]
        ints, floats = spec((b,), jnp.int32), spec((b,), jnp.float32)
        if row["operation"] == "encode":
            stem_in = (spec((b, _batching.window_samples(config, k)), jnp.float32), ints, floats)
            stem = _programs.encode_stem.lower(model, *stem_in)
            out = jax.tree.map(lambda x: spec(x.shape, x.dtype), stem.out_info)
            stack = stack_fn.lower(model, out["chunks"], out["chunk_mask"], stack="semantic")
            finish = _programs.encode_finish.lower(model, None, out, out["chunks"], ints, ints,
                                                   keys=("z",))
            peaks = _programs.window_peaks.lower(model, stem_in[0], ints)
            stages = {"peaks": peaks, "stem": stem, "stack": stack, "finish": finish}
        else:
            stem = _programs.decode_stem.lower(model, spec((b, k, config.decoder_dim), jnp.float32),
                                               spec((b, k), jnp.bool_))
            x, keep = (spec(o.shape, o.dtype) for o in stem.out_info)
            stages = {"stem": stem, "stack": stack_fn.lower(model, x, keep, stack="decoder"),
                      "finish": _programs.decode_finish.lower(model, x, keep)}
        for planned in row["stages"]:
            flops, memory = cost(stages[planned["stage"]])
            planned_memory = (planned["argument_bytes"] + planned["temp_bytes"]
                              + planned["output_bytes"])
            found.append([row["operation"], k, planned["stage"], planned["flops"], flops,
                          planned_memory, memory])
    print("CHECK " + json.dumps(found))
""")


def test_the_plan_matches_an_independent_compile():
    """The plan's per-chip FLOPs (scans corrected for their other layers) equal each stage
    compiled on its own for one chip, with the stacks unrolled (within 2%), and so does its
    memory (within 5%; the stacks' scans, which hold one layer at a time, aside)."""
    result = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, str(TINY_CONFIG)],
                            capture_output=True, text=True, env=_child_environment(),
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("CHECK ")]
    found = json.loads(line[len("CHECK "):])
    assert len(found) == 4 + 3 * 2  # encode at the chunk (with its peak pass), decode at 32, 64
    for operation, tokens, stage, planned, independent, memory, own_memory in found:
        assert planned == pytest.approx(independent, rel=0.02), (operation, tokens, stage)
        if stage != "stack":
            assert memory == pytest.approx(own_memory, rel=0.05), (operation, tokens, stage)


def _plan(*args: str) -> subprocess.CompletedProcess:
    env = _child_environment()
    return subprocess.run([sys.executable, "-m", "losatok_jax.plan", "--target", "v5e-8",
                           "--config_path", str(TINY_CONFIG), "--dtype", "bfloat16", *args],
                          capture_output=True, text=True, env=env, timeout=900)


def test_the_batch_plan_holds_the_largest_batch_that_fits(tmp_path):
    """`--batch_plan` writes, per encode bucket, a batch whose programs fit the HBM budget while
    twice that batch does not (the plan refuses it with one error line), and the report says
    what it found."""
    budget = "0.0003"  # of a v5e chip's 16 GiB: about 5.2 MB, a few dozen of the tiny rows
    found = _plan("--operations", "encode", "--buckets", "10", "--hbm_fraction", budget,
                  "--max_batch", "64", "--batch_plan", str(tmp_path / "batches.json"),
                  "--json", str(tmp_path / "report.json"))
    assert found.returncode == 0, found.stderr[-3000:]
    batch = json.loads((tmp_path / "batches.json").read_text())["encode_batches"]["10"]
    [row] = json.loads((tmp_path / "report.json").read_text())["programs"]
    assert row["largest_batch"]["batch_per_chip"] == batch and 8 < batch < 64
    assert row["largest_batch"]["hbm_bytes_per_chip"] <= float(budget) * (16 << 30)
    twice = _plan("--operations", "encode", "--buckets", "10", "--hbm_fraction", budget,
                  "--batch_size", str(2 * batch))
    assert twice.returncode == 2, twice.stderr[-3000:]
    assert twice.stderr.splitlines()[-1].startswith("error: encode at 10 tokens needs ")
