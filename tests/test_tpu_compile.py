"""Compiled for a TPU pod on this CPU: the tiny model's encode and decode programs, lowered
through the real runners (`MeshRunner` over both hosts' chips, `PmapRunner` over one host's) on
abstract parameters, compiled by the TPU compiler (libtpu) for the compile-only devices of a
2-host v5e slice. Each program holds no collective and fits a chip's memory with the parameters
held once.

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
            report[name].append({
                "name": re.search(r"HloModule (\S+)", text).group(1),
                "collectives": re.findall(
                    r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                    r"(?:-start)?\(", text),
                "argument_bytes": memory.argument_size_in_bytes,
                "temp_bytes": memory.temp_size_in_bytes,
                "output_bytes": memory.output_size_in_bytes,
                "flops": compiled.cost_analysis().get("flops", 0.0)})
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_compiles_for_a_two_host_v5e_slice(dtype):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
           "TPU_WORKER_HOSTNAMES": "localhost",
           "PYTHONPATH": os.pathsep.join(filter(None, [COMPILER, str(REPO_ROOT)]))}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY_CONFIG), dtype],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT "):])
    assert (report["hosts"], report["chips"], report["local"]) == (2, 8, [4, 4])
    assert report["kind"].startswith("TPU v5")
    chip_memory = 16 << 30  # v5e
    for runner in ("mesh", "pmap"):  # both lower and compile on compile-only devices
        programs = report[runner]
        # Per batch bucket: the peak pass; stem, stack, finish for each encode length (32 and
        # the tiny model's 10-token chunk) and for each decode length (32, 64).
        assert len(programs) == 1 + 3 * 1 + 3 * 2, [p["name"] for p in programs]
        for program in programs:
            assert program["collectives"] == [], program  # data parallel: nothing crosses chips
            assert program["flops"] > 0, program
            used = program["argument_bytes"] + program["temp_bytes"] + program["output_bytes"]
            assert used < chip_memory, program
            # Parameters are held once per chip, not once per row or per device.
            assert program["argument_bytes"] < report["param_bytes"] + (4 << 20), program
