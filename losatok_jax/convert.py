"""Convert upstream LoSATok PyTorch checkpoints into a losatok-jax Orbax checkpoint directory.

    python -m losatok_jax.convert --model_path losatok_kl1e-2.pth \
        [--config_path 16k_16k_25Hz_losatok.yml] [--semantic_encoder_path semantic_encoder.pth] \
        --output_dir ckpts/losatok_kl1e-2

(`python convert/torch_to_orbax.py` with the same flags runs this from a checkout.)

The semantic-encoder source may be upstream's `semantic_encoder.pth` or a MiDashengLM Hugging Face
checkpoint folder (safetensors shards with `audio_encoder.*` keys); its tensors replace the full
checkpoint's `semantic_encoder.*` ones. Every size the tensors determine is cross-checked against
the config, stored buffers against our own windows and filterbanks, and every key against the model:
any disagreement exits with status 2 and a message naming the keys. Nothing is written unless the
whole conversion succeeds. Tensors are read memory-mapped, without torch (`_torch_format`), and
written a group at a time, so memory stays a little above the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from losatok_jax import _cli, _files, _hub, _key_mapping, _torch_format, checkpoint
from losatok_jax.config import RELEASED_CONFIG, LosatokConfig, from_upstream_yaml
from losatok_jax.errors import LosatokError

class ConversionError(LosatokError):
    """Conversion cannot go on; the message says why and names the keys involved."""


def _to_numpy(tensor) -> np.ndarray:
    """A tensor's values as numpy: float32 as mapped (no copy), other floats cast to float32."""
    array = tensor.numpy() if isinstance(tensor, _torch_format.MappedTensor) else tensor
    if not isinstance(array, np.ndarray):
        raise ConversionError(f"expected tensors, found {type(tensor).__name__}")
    if array.dtype == np.float32 or array.dtype.kind not in "fV":
        return array
    return array.astype(np.float32)  # bf16/fp16 checkpoints


def read_torch_state(path: str | Path) -> dict:
    """A bare or {"state_dict": ...} checkpoint's tensors, memory-mapped: nothing is read until
    a tensor is used (`_torch_format`; no torch needed)."""
    try:
        loaded = _torch_format.Checkpoint(path).load()
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # our reader's own errors, or pickle/zip errors of a damaged file
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    for key, value in loaded.items():
        if not isinstance(value, _torch_format.MappedTensor):
            raise ConversionError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    return dict(loaded)


def read_semantic_source(path: str | Path) -> dict[str, np.ndarray]:
    """Semantic-encoder tensors under their full-checkpoint names (`semantic_encoder.*`)."""
    path = Path(path)
    if path.is_dir():
        return _read_midashenglm_folder(path)
    state = read_torch_state(path)
    foreign = sorted(k for k in state if not k.startswith(("encoder.", "bottleneck.")))
    if foreign:
        raise ConversionError(f"{path}: unexpected keys in a semantic-encoder checkpoint (expected "
                              f"encoder.* and bottleneck.*): {', '.join(foreign[:10])}")
    return {f"semantic_encoder.{k}": v for k, v in state.items()}


def _read_midashenglm_folder(path: Path) -> dict[str, np.ndarray]:
    """`audio_encoder.*` tensors from a MiDashengLM safetensors folder, read lazily by key."""
    from safetensors import safe_open

    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ConversionError(f"{path}: no .safetensors files in this folder")
    state = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="numpy") as f:
                for key in f.keys():
                    # The encoder's own mel front end holds only recomputable buffers.
                    if key.startswith("audio_encoder.") and ".front_end." not in key:
                        name = "semantic_encoder.encoder." + key[len("audio_encoder."):]
                        state[name] = f.get_tensor(key)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{shard}: not a readable safetensors file ({e})") from None
    if not state:
        raise ConversionError(f"{path}: no audio_encoder.* tensors found")
    return state


def _upstream_name(flax_path: tuple[str, ...]) -> str:
    """Best-effort upstream spelling of a Flax parameter path, for error messages."""
    leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    parts = [p + ".{i}" if p in ("blocks", "convnext") else p for p in flax_path[:-1]]
    return ".".join(parts + [leaf.get(flax_path[-1], flax_path[-1])])


# A mismatch names this many problems at most (a wrong config can mismatch every key).
MAX_PROBLEMS_SHOWN = 8
# Parameters are written in groups of about this many bytes (each an Orbax partial save).
GROUP_BYTES = 256 << 20


def plan_params(state: Mapping, config: LosatokConfig) -> dict[str, _key_mapping.Leaf]:
    """Checks `state` (tensors, not yet read) against `config`: sizes, stored buffers, keys and
    shapes. Returns how to build each parameter; raises naming every disagreement."""
    problems = _key_mapping.config_disagreements(
        _key_mapping.infer_config(state, config.semantic.num_heads), config)
    buffers = {key: _to_numpy(value) for key, value in state.items()
               if _key_mapping.is_buffer(key)}
    problems += _key_mapping.check_buffers(buffers, config)
    try:
        leaves = _key_mapping.plan(state)
    except _key_mapping.MappingError as e:
        raise ConversionError("; ".join(problems + [str(e)])) from None
    expected = {"/".join(k): v for k, v in
                flatten_dict(checkpoint.abstract_params(config)).items()}
    for path in sorted(set(expected) - set(leaves)):
        problems.append(f"missing key {_upstream_name(tuple(path.split('/')))}")
    for path in sorted(set(leaves) - set(expected)):
        problems.append(f"unexpected key {_upstream_name(tuple(path.split('/')))}")
    for path in sorted(set(leaves) & set(expected)):
        leaf = leaves[path]
        shape = leaf.shape(tuple(state[leaf.sources[0]].shape))
        if shape != expected[path].shape:
            problems.append(f"shape mismatch at {_upstream_name(tuple(path.split('/')))}: "
                            f"converted {shape}, model expects {expected[path].shape}")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise ConversionError("checkpoint does not match the config: " + "; ".join(shown)
                              + (f"; and {more} more" if more else ""))
    return leaves


def _build(leaf: _key_mapping.Leaf, state: Mapping) -> np.ndarray:
    """One parameter's values; each source tensor's pages are dropped once it is copied."""
    def read(key):
        return _to_numpy(state[key])

    array = leaf.build(read)
    for key in leaf.sources:
        # A copy (stacked or cast) no longer needs the mapped source: drop its pages.
        if array.base is None and isinstance(state[key], _torch_format.MappedTensor):
            state[key].release()
    return array


def param_groups(state: Mapping, leaves: Mapping[str, _key_mapping.Leaf]):
    """{flat path tuple: array} groups of about GROUP_BYTES, built one group at a time."""
    group, size = {}, 0
    for path in sorted(leaves):
        array = _build(leaves[path], state)
        group[tuple(path.split("/"))] = array
        size += array.nbytes
        if size >= GROUP_BYTES:
            yield group
            group, size = {}, 0
    if group:
        yield group


def build_params(state: Mapping, config: LosatokConfig) -> dict:
    """Checks `state` against `config` and returns the whole Flax parameter tree in memory."""
    leaves = plan_params(state, config)
    return unflatten_dict({k: v for group in param_groups(state, leaves) for k, v in group.items()})


def _check_output(output_dir: Path, inputs: list[tuple[str, object]]) -> None:
    """A new or empty folder that is no input, nor inside one, and can be written."""
    _files.check_apart(output_dir, "--output_dir", inputs)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConversionError(f"{output_dir} exists and is not empty; choose a new directory")
    _files.check_writable_folder(output_dir)


def convert(config_path, model_path, output_dir, semantic_encoder_path=None) -> LosatokConfig:
    """Converts upstream checkpoints into a new checkpoint directory; nothing is left in
    `output_dir` unless the whole conversion succeeds. The inputs are checked (config, keys,
    shapes) before the output."""
    config = from_upstream_yaml(config_path)
    output_dir = Path(output_dir)
    state = read_torch_state(model_path)
    if semantic_encoder_path is not None:
        state.update(read_semantic_source(semantic_encoder_path))
    leaves = plan_params(state, config)
    _check_output(output_dir, [("--model_path", model_path), ("--config_path", config_path),
                               ("--semantic_encoder_path", semantic_encoder_path)])
    existed = output_dir.exists()
    try:
        checkpoint.save_in_groups(output_dir, config, param_groups(state, leaves))
    except BaseException:
        if not existed:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return config


def _parser() -> argparse.ArgumentParser:
    parser = _cli.Parser("convert", __doc__.split("\n\n")[0])
    parser.add_argument("--config_path", default=RELEASED_CONFIG,
                        help=f"upstream YAML config (default: the released {RELEASED_CONFIG})")
    parser.add_argument("--model_path", required=True,
                        help="upstream LoSATok .pth checkpoint, or hf://OWNER/REPO/FILE.pth")
    parser.add_argument("--semantic_encoder_path", default=None,
                        help="semantic_encoder.pth (or hf://OWNER/REPO/FILE.pth), or a "
                             "MiDashengLM safetensors folder")
    parser.add_argument("--output_dir", required=True, help="new directory for the checkpoint")
    return parser


def _run(args: argparse.Namespace) -> None:
    config = convert(args.config_path, _hub.local_file(args.model_path, "--model_path"),
                     args.output_dir, _hub.local_file(args.semantic_encoder_path,
                                                               "--semantic_encoder_path"))
    print(f"wrote {args.output_dir}")
    print(json.dumps(config.to_dict(), sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
