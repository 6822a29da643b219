"""Runners: where and how the programs of a batch plan run.

    Runner(model)       one device; on CPU, each stack of layers one jitted layer at a time
    MeshRunner(model)   jit over a 1-D device mesh: batch rows sharded, parameters replicated
    PmapRunner(model)   pmap over this process's devices

    features = losatok_jax.encode(model, clips, runner=MeshRunner(model))

A runner composes the stages of `_programs` into the three steps a plan needs (`window_peaks`,
`encode_windows`, `decode_rows`); subclasses only place batches on devices their own way (`call`,
`to_host`). `encode_windows` leaves its results on the devices until `to_host` fetches them.
Batch buckets and the token budget count per device: a batch holds `num_devices` times as much.
Results equal single-device results; only the placement differs.

Across hosts, a `MeshRunner` over a global mesh runs one SPMD program: every process must then make
the same sequence of calls with the same bucket shapes, each passing its own share of each batch.
Independent jobs per host (as `losatok_jax.extract` runs) use a mesh of local devices.
"""

from __future__ import annotations

import functools
import weakref
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from losatok_jax import _programs
from losatok_jax._modules import LAYER_STACKS
from losatok_jax.errors import LosatokError
from losatok_jax.model import FEATURE_KEYS, Losatok

DATA_AXIS = "data"

# Rows of a position-wise matmul per block in the CPU layer programs (`_layers.in_row_blocks`):
# XLA's CPU matmul slows down on very long row counts.
CPU_MATMUL_ROWS = 1024


class Runner:
    """Runs a plan's batches on one device and brings results to the host.

    With parameters on the CPU it runs each stack of layers as one jitted call per layer on
    per-layer views of the stacked weights (`per_layer_weights`): XLA's CPU loop would otherwise
    copy each layer's weights out of the stacked arrays, which dominates at short inputs.
    Elsewhere (an accelerator, or inside a trace) a stack runs as one scan.
    """

    num_devices = 1
    layers: dict[str, list] | None = None

    def __init__(self, model: Losatok):
        self.model = model
        self.layers = per_layer_weights(model)

    # Placement: how one stage runs on a batch, and how its results come back.

    def call(self, stage, shared: tuple, batched: tuple, **static):
        """stage(model, *shared, *batched, **static); `batched` has the batch as leading axis."""
        return stage(self.model, *shared, *batched, **static)

    def to_host(self, out):
        return jax.device_get(out)

    def run_stack(self, stack: str, x, mask):
        if self.layers is None:
            return self.call(_programs.scan_stack, (), (x, mask), stack=stack)
        for weights in self.layers[stack]:
            x = _programs.apply_layer(weights, x, mask, **self._layer_static(stack))
        return x

    def _layer_static(self, stack: str) -> dict:
        return dict(config=self.model.config, dtype=self.model.dtype, stack=stack,
                    max_rows=CPU_MATMUL_ROWS)

    # The steps a batch plan runs (`_execution`).

    def window_peaks(self, buffers, valid_frames) -> np.ndarray:
        return self.to_host(self.call(_programs.window_peaks, (), (buffers, valid_frames)))

    def encode_windows(self, rng, buffers, valid_frames, peak_db, noise_ids, starts,
                       keys=FEATURE_KEYS) -> dict[str, jax.Array]:
        """Starts encoding a batch of windows and returns its features where they are computed
        (`to_host` brings them back): JAX dispatches asynchronously, so the host can prepare
        the next batch while this one runs."""
        stem = self.call(_programs.encode_stem, (), (buffers, valid_frames, peak_db))
        chunks = self.run_stack("semantic", stem["chunks"], stem["chunk_mask"])
        return self.call(_programs.encode_finish, (rng,), (stem, chunks, noise_ids, starts),
                         keys=keys)

    def decode_rows(self, z, token_mask) -> np.ndarray:
        """Latent rows (B, T, D) with `token_mask` (B, T) marking real latents -> audio."""
        x, keep = self.call(_programs.decode_stem, (), (z, token_mask))
        x = self.run_stack("decoder", x, keep)
        return self.to_host(self.call(_programs.decode_finish, (), (x, keep)))

    # What `warmup` compiles: the same programs the steps above run, lowered from shapes.

    @property
    def device(self) -> jax.Device:
        first = jax.tree.leaves(self.model.params)[0]
        if isinstance(first, jax.Array):
            return next(iter(first.devices()))
        sharding = getattr(first, "sharding", None)  # abstract parameters placed by the caller
        return next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]

    @property
    def batch_sharding(self) -> jax.sharding.Sharding:
        """Where a batch (host rows, or a stage's outputs) lives between stages."""
        return jax.sharding.SingleDeviceSharding(self.device)

    def batch_spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """A host batch of `shape` as the runner's first stage receives it (here: numpy, placed
        by the call itself)."""
        return jax.ShapeDtypeStruct(shape, dtype)

    def lower(self, stage, shared: tuple, batched: tuple, **static):
        """`stage` lowered as `call` runs it, from `batch_spec`s (no data needed)."""
        return stage.lower(self.model, *shared, *batched, **static)

    def compile(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """Compiles a program `lower` gave, so that `call` will not compile it again."""
        return lowered.compile()

    def outputs(self, lowered: jax.stages.Lowered):
        """A lowered stage's outputs as the next stage receives them (shapes, placed)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=self.batch_sharding),
                            lowered.out_info)

    def lower_stack(self, stack: str, x, mask):
        if self.layers is None:
            return self.lower(_programs.scan_stack, (), (x, mask), stack=stack)
        layer = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype),
                             self.layers[stack][0])
        return _programs.apply_layer.lower(layer, x, mask, **self._layer_static(stack))


def _params_on_host_cpu(model: Losatok) -> bool:
    """Whether every parameter is a concrete array on one CPU device (or numpy)."""
    def on_cpu(leaf):
        if isinstance(leaf, np.ndarray):
            return True
        return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
                and len(leaf.devices()) == 1 and next(iter(leaf.devices())).platform == "cpu")

    return all(on_cpu(leaf) for leaf in jax.tree.leaves(model.params))


def stacked_weights(model: Losatok, stack: str):
    """The parameters of `LAYER_STACKS[stack]`, every leaf stacked on a leading layer axis."""
    tree = model.params
    for key in LAYER_STACKS[stack][0]:
        tree = tree[key]
    return tree


def per_layer_weights(model: Losatok) -> dict[str, list] | None:
    """Every stack's layers as separate arrays that share the stacked arrays' memory, or None
    where they could not share it (parameters on an accelerator, sharded, or traced).

    On CPU a numpy view of one layer of a stacked array goes through `jax.device_put` without a
    copy (where it is 64-byte aligned, as every large kernel is), so this costs no memory. The
    result is kept while `model` lives: `encode(model, ...)` makes a Runner per call.
    """
    if not _params_on_host_cpu(model):
        return None
    stacked = {stack: stacked_weights(model, stack) for stack in LAYER_STACKS}
    leaves = jax.tree.leaves(stacked)
    cached = _PER_LAYER_CACHE.get(id(model))
    if cached is None or not all(a is b for a, b in zip(cached[0], leaves)):
        layers = {}
        for stack, weights in stacked.items():
            host = jax.tree.map(np.asarray, weights)
            depth = len(jax.tree.leaves(host)[0])
            layers[stack] = [jax.tree.map(lambda x, i=i: x[i], host) for i in range(depth)]
        if cached is None:
            weakref.finalize(model, _PER_LAYER_CACHE.pop, id(model), None)
        _PER_LAYER_CACHE[id(model)] = cached = (leaves, jax.device_put(layers))
    return cached[1]


# id(model) -> (its stacked weight arrays, their per-layer arrays); an entry leaves with its model,
# and is rebuilt if the model's parameter dict was changed in place.
_PER_LAYER_CACHE: dict[int, tuple[list, dict[str, list]]] = {}


class PmapRunner(Runner):
    """pmap over local devices, with parameters replicated onto each device once."""

    def __init__(self, model: Losatok, devices: Sequence[jax.Device] | None = None):
        self.devices = list(devices or jax.local_devices())
        self.num_devices = len(self.devices)
        self.model = _replicate(model, self.devices)
        self._pmapped = functools.cache(self._make_pmapped)
        self._lowered_keys: dict[int, tuple] = {}
        self._compiled: dict[tuple, jax.stages.Compiled] = {}

    @property
    def device(self) -> jax.Device:
        return self.devices[0]

    @property
    def batch_sharding(self) -> jax.sharding.Sharding:
        return NamedSharding(Mesh(np.array(self.devices), ("devices",)), PartitionSpec("devices"))

    def batch_spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """A batch of `shape` as pmap receives it: rows split per device."""
        split = (self.num_devices, shape[0] // self.num_devices, *shape[1:])
        return jax.ShapeDtypeStruct(split, dtype, sharding=self.batch_sharding)

    def _split(self, batched: tuple) -> list:
        """Host rows split per device, (B, ...) -> (devices, B / devices, ...); a previous
        stage's outputs (and `batch_spec`s) already are."""
        return [x.reshape(self.num_devices, -1, *x.shape[1:]) if isinstance(x, np.ndarray)
                else x for x in batched]

    def _make_pmapped(self, stage, num_shared: int, num_batched: int, static: tuple):
        return jax.pmap(functools.partial(stage, **dict(static)),
                        in_axes=(0,) + (None,) * num_shared + (0,) * num_batched,
                        devices=self.devices)

    def call(self, stage, shared: tuple, batched: tuple, **static):
        per_device = self._split(batched)
        compiled = self._compiled.get(_call_key(stage, static, shared, per_device))
        if compiled is not None:  # compiled ahead of time by `warmup`
            return compiled(self.model, *shared, *per_device)
        return self._pmapped(*_program_key(stage, shared, batched, static))(
            self.model, *shared, *per_device)

    def lower(self, stage, shared: tuple, batched: tuple, **static):
        per_device = self._split(batched)
        lowered = self._pmapped(*_program_key(stage, shared, batched, static)).lower(
            self.model, *shared, *per_device)
        self._lowered_keys[id(lowered)] = _call_key(stage, static, shared, per_device)
        return lowered

    def compile(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """pmap's calls do not reuse ahead-of-time compilations, so the runner keeps them and
        calls them itself."""
        compiled = lowered.compile()
        key = self._lowered_keys.pop(id(lowered), None)
        if key is not None:
            self._compiled[key] = compiled
        return compiled

    def to_host(self, out):
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), jax.device_get(out))


class MeshRunner(Runner):
    """jit over a 1-D mesh: each batch is sharded on its leading axis, parameters replicated.

    Each stage runs under `shard_map`, every device on its own rows: data parallelism by
    construction, with no collective, whatever the partitioner would make of an operation (it
    gathers a batch-sharded FFT onto every device). Each process passes its own rows; with a
    multi-process mesh they form one global batch and each process gets back the results of its
    rows.
    """

    def __init__(self, model: Losatok, mesh: Mesh | None = None):
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), (DATA_AXIS,))
        if self.mesh.axis_names != (DATA_AXIS,):
            raise LosatokError(f"MeshRunner needs a 1-D mesh with axis {DATA_AXIS!r}; got "
                             f"{self.mesh.axis_names}")
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        self.num_devices = len(local)  # batch rows this process contributes per device bucket
        self._rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.model = _place(model, NamedSharding(self.mesh, PartitionSpec()))
        self._mapped = functools.cache(self._make_mapped)

    def _make_mapped(self, stage, num_shared: int, num_batched: int, static: tuple):
        def run(model, *args):
            return stage(model, *args, **dict(static))

        run.__name__ = stage.__name__  # names the compiled program after its stage
        specs = ((PartitionSpec(),) * (1 + num_shared)
                 + (PartitionSpec(DATA_AXIS),) * num_batched)
        return jax.jit(jax.shard_map(run, mesh=self.mesh, in_specs=specs,
                                     out_specs=PartitionSpec(DATA_AXIS), check_vma=False))

    @property
    def batch_sharding(self) -> jax.sharding.Sharding:
        return self._rows

    def batch_spec(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """Every process's rows of a batch: `shape` counts this process's rows, as `call`
        receives them; the global batch holds every process's."""
        rows = shape[0] * self.mesh.devices.size // self.num_devices
        return jax.ShapeDtypeStruct((rows, *shape[1:]), dtype, sharding=self._rows)

    def place_rows(self, batched) -> list:
        """Host batches as global arrays of the mesh; a previous stage's outputs already are."""
        return [jax.make_array_from_process_local_data(self._rows, x)
                if isinstance(x, np.ndarray) else x for x in batched]

    def call(self, stage, shared: tuple, batched: tuple, **static):
        return self._mapped(*_program_key(stage, shared, batched, static))(
            self.model, *shared, *self.place_rows(batched))

    def lower(self, stage, shared: tuple, batched: tuple, **static):
        return self._mapped(*_program_key(stage, shared, batched, static)).lower(
            self.model, *shared, *batched)

    def to_host(self, out):
        return jax.tree.map(_process_rows, out)


def _program_key(stage, shared: tuple, batched: tuple, static: dict) -> tuple:
    """The arguments of a runner's cached transform of `stage` (pmap's, shard_map's)."""
    return stage, len(shared), len(batched), tuple(sorted(static.items()))


def _call_key(stage, static: dict, shared: tuple, batched: list) -> tuple:
    """What identifies one compiled program of a stage: its static arguments and the shapes and
    dtypes of its inputs."""
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves((shared, batched)))
    return stage, tuple(sorted(static.items())), shapes


def _is_abstract(tree) -> bool:
    """Whether `tree`'s leaves are shapes (`jax.ShapeDtypeStruct`), not arrays."""
    return all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def _place(tree, sharding: jax.sharding.Sharding):
    """`tree` on `sharding`, once; abstract parameters (shapes) get the sharding attached, so a
    runner built on them lowers and compiles programs for devices it need not have."""
    if _is_abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)
    return jax.device_put(tree, sharding)


def _replicate(tree, devices: Sequence[jax.Device]):
    """One copy of every leaf per device, stacked on a leading axis as pmap expects; the host
    side is a broadcast view, so nothing is copied n times in memory."""
    stacked = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    if _is_abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(devices), *x.shape), x.dtype,
                                                           sharding=stacked), tree)
    return jax.tree.map(lambda x: jax.device_put(
        np.broadcast_to(np.asarray(x), (len(devices), *x.shape)), stacked), tree)


def _process_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded result, in order."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])
