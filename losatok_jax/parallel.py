"""Data-parallel encode and decode: every bucketed batch spread over several devices.

    runner = MeshRunner(model)                 # jit over a Mesh: batch sharded, params replicated
    runner = PmapRunner(model)                 # pmap over this process's devices
    features = losatok_jax.encode(model, clips, runner=runner)

Batch buckets and the token budget count per device: a batch holds `num_devices` times as much.
Results equal single-device results; only the placement differs.

Across hosts, a `MeshRunner` over a global mesh runs one SPMD program: every process must then
make the same sequence of calls with the same bucket shapes, each passing its own share of each
batch. Independent jobs per host (as `losatok_jax.extract` runs) use a mesh of local devices.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from losatok_jax.model import Losatok, Runner

DATA_AXIS = "data"


class PmapRunner(Runner):
    """pmap over local devices, with parameters replicated onto each device once."""

    def __init__(self, model: Losatok, devices: Sequence[jax.Device] | None = None):
        self.devices = list(devices or jax.local_devices())
        self.num_devices = len(self.devices)
        self.model = _replicate(model, self.devices)
        self._compiled = {}

    def _pmapped(self, program, num_shared: int, num_batched: int, static: tuple):
        key = (program, num_shared, num_batched, static)
        if key not in self._compiled:
            self._compiled[key] = jax.pmap(
                functools.partial(program, **dict(static)),
                in_axes=(0,) + (None,) * num_shared + (0,) * num_batched, devices=self.devices)
        return self._compiled[key]

    def run(self, program, shared: tuple, batched: tuple, **static):
        pmapped = self._pmapped(program, len(shared), len(batched), tuple(sorted(static.items())))
        per_device = [x.reshape(self.num_devices, -1, *x.shape[1:]) for x in batched]
        out = jax.device_get(pmapped(self.model, *shared, *per_device))
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


class MeshRunner(Runner):
    """jit over a 1-D mesh: each batch is sharded on its leading axis, parameters replicated.

    Each process passes its own rows; with a multi-process mesh they form one global batch and
    each process gets back the results of its rows.
    """

    def __init__(self, model: Losatok, mesh: Mesh | None = None):
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), (DATA_AXIS,))
        if self.mesh.axis_names != (DATA_AXIS,):
            raise ValueError(f"MeshRunner needs a 1-D mesh with axis {DATA_AXIS!r}; got "
                             f"{self.mesh.axis_names}")
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        self.num_devices = len(local)  # batch rows this process contributes per device bucket
        self._rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.model = jax.device_put(model, NamedSharding(self.mesh, PartitionSpec()))

    def run(self, program, shared: tuple, batched: tuple, **static):
        global_rows = [jax.make_array_from_process_local_data(self._rows, x) for x in batched]
        out = program(self.model, *shared, *global_rows, **static)
        return jax.tree.map(_process_rows, out)


def _replicate(tree, devices: Sequence[jax.Device]):
    """One copy of every leaf per device, stacked on a leading axis as pmap expects; the host
    side is a broadcast view, so nothing is copied n times in memory."""
    stacked = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    return jax.tree.map(lambda x: jax.device_put(
        np.broadcast_to(np.asarray(x), (len(devices), *x.shape)), stacked), tree)


def _process_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded result, in order."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])
