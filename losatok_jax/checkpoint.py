"""Converted checkpoints on disk: `DIR/config.json` (the resolved config) + `DIR/params` (Orbax).

The config travels with the weights, so `load_losatok(DIR)` needs nothing else. Restoring uses the
parameter shapes the config implies, so a checkpoint that does not fit its config fails here, with
the offending parameter named, rather than deep inside a jitted call.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from losatok_jax.config import ConfigError, LosatokConfig
from losatok_jax.errors import LosatokError
from losatok_jax.model import Losatok, init_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Where Orbax's partial saves put the tree: a complete checkpoint in `save`'s own format.
_PARTIAL_TREE_DIR = "state"


class CheckpointError(LosatokError):
    """A checkpoint directory that is missing, incomplete or does not match its config."""


def abstract_params(config: LosatokConfig):
    """Parameter shapes and dtypes for `config`, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def save(path: str | os.PathLike, model: Losatok) -> None:
    """Writes `model` to a new directory `path` (refuses to overwrite an existing checkpoint):
    `save_in_groups` with the whole tree as one group."""
    save_in_groups(path, model.config, [flatten_dict(model.params)])


def save_in_groups(path: str | os.PathLike, config: LosatokConfig,
                   groups: Iterable[dict[tuple[str, ...], np.ndarray]]) -> None:
    """Writes a checkpoint whose parameters arrive a group at a time ({flat path: array}, the
    groups disjoint and together the whole tree), holding one group in memory, not the model.

    Each group is an Orbax partial save into a scratch folder beside `path`; the finished tree is
    then moved into place as `params/` (the layout `load` restores with Orbax's standard
    checkpointer), and config.json is written last: a directory with it is complete.
    """
    from orbax.checkpoint import v1 as ocp_v1

    path = Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise CheckpointError(f"{path} already holds a checkpoint; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    scratch = path / "params.partial"  # Orbax also writes `params.partial.partial_save*` beside it

    def clean():
        for leftover in path.glob(scratch.name + "*"):
            shutil.rmtree(leftover, ignore_errors=True)

    clean()
    try:
        for group in groups:
            ocp_v1.partial.save(scratch, unflatten_dict(group))
        ocp_v1.partial.finalize(scratch)
        os.replace(scratch / _PARTIAL_TREE_DIR, path / PARAMS_DIR)
    finally:
        clean()
    (path / CONFIG_FILE).write_text(config.to_json())


def load(path: str | os.PathLike) -> Losatok:
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{path} is not a converted LoSATok checkpoint (expected {CONFIG_FILE} and "
            f"{PARAMS_DIR}/; convert upstream .pth files with python -m losatok_jax.convert)")
    try:
        config = LosatokConfig.from_json((path / CONFIG_FILE).read_text())
    except (ValueError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          abstract_params(config))
    # Each process reads the whole checkpoint on its own: no cross-process barriers, so loading
    # works the same under jax.distributed as alone.
    this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                      active_processes={jax.process_index()})
    checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process)
    try:
        params = checkpointer.restore(path / PARAMS_DIR, target)
    except Exception as e:  # Orbax and TensorStore raise bare Exceptions for damaged data
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"{path}: cannot restore parameters for config.json ({reason})"
        raise CheckpointError(_mismatch(checkpointer, path, target) or message) from e
    return Losatok(jax.tree.map(jnp.asarray, params), config)


def mismatch(path: str | os.PathLike) -> str | None:
    """Why the parameter names stored in checkpoint `path` differ from those its config.json
    implies (an earlier version's layout among them), or None where they agree; reads only
    metadata, so it costs a fraction of a second where `load` reads every parameter."""
    path = Path(path).absolute()
    config = LosatokConfig.from_json((path / CONFIG_FILE).read_text())
    return _mismatch(ocp.StandardCheckpointer(), path, abstract_params(config))


def _mismatch(checkpointer, path: Path, target) -> str | None:
    try:
        stored = set(flatten_dict(dict(checkpointer.metadata(path / PARAMS_DIR).item_metadata)))
    except Exception:  # unreadable metadata: the restore error says enough
        return None
    expected = set(flatten_dict(target))
    if stored == expected:
        return None
    if any(key[:-1] + ("kernel",) in stored for key in expected - stored if key[-1] == "weight"):
        return (f"{path} was converted by an earlier losatok-jax, which stored linear layers as "
                f"(in, out) `kernel`s; convert the upstream .pth files again with "
                f"python -m losatok_jax.convert")
    names = sorted("/".join(k) for k in expected - stored)
    extra = sorted("/".join(k) for k in stored - expected)
    return (f"{path}: parameters do not match config.json (missing: {', '.join(names[:3]) or '-'}"
            f"; unexpected: {', '.join(extra[:3]) or '-'})")


def check_same_config(given: LosatokConfig, stored: LosatokConfig, given_path, stored_path):
    """Raises if a user's config disagrees with the one stored in a checkpoint."""
    if given == stored:
        return
    differences = _differences(dataclasses.asdict(given), dataclasses.asdict(stored))
    raise ConfigError(f"{given_path} disagrees with the config stored in {stored_path}: "
                      + "; ".join(f"{key}: {a!r} vs {b!r}" for key, a, b in differences))


def _differences(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            yield from _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            yield f"{prefix}{key}", a.get(key), b.get(key)
