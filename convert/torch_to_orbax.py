"""Convert upstream LoSATok PyTorch checkpoints into a losatok-jax Orbax checkpoint directory.

    python convert/torch_to_orbax.py --config_path config/16k_16k_25Hz_losatok.yml \
        --model_path losatok_kl1e-2.pth [--semantic_encoder_path semantic_encoder.pth] \
        --output_dir ckpts/losatok_kl1e-2

The semantic-encoder source may be upstream's `semantic_encoder.pth` or a MiDashengLM Hugging Face
checkpoint folder (safetensors shards with `audio_encoder.*` keys); its tensors replace the full
checkpoint's `semantic_encoder.*` ones. Every size the tensors determine is cross-checked against
the config, stored buffers against our own windows and filterbanks, and every key against the model:
any disagreement exits with status 2 and a message naming the keys. Nothing is written unless the
whole conversion succeeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

if __package__ in (None, ""):  # run as a script: make `convert` and `losatok_jax` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from convert import mapping  # noqa: E402
from losatok_jax import checkpoint  # noqa: E402
from losatok_jax.config import ConfigError, LosatokConfig, from_upstream_yaml  # noqa: E402
from losatok_jax.model import Losatok  # noqa: E402


class ConversionError(Exception):
    """Conversion cannot go on; the message says why and names the keys involved."""


def _to_numpy(tensor) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"expected tensors, found {type(tensor).__name__}")
    tensor = tensor.detach()
    if tensor.dtype == torch.float32 or not tensor.dtype.is_floating_point:
        return tensor.numpy()
    return tensor.float().numpy()  # bf16/fp16 checkpoints: numpy has no bfloat16


def read_torch_state(path: str | Path) -> dict[str, np.ndarray]:
    """A bare or {"state_dict": ...} checkpoint as float32 numpy arrays (memory-mapped reads)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # truncated or foreign files raise assorted pickle/zip errors
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return {key: _to_numpy(value) for key, value in loaded.items()}


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
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    # The encoder's own mel front end holds only recomputable buffers.
                    if key.startswith("audio_encoder.") and ".front_end." not in key:
                        name = "semantic_encoder.encoder." + key[len("audio_encoder."):]
                        state[name] = _to_numpy(f.get_tensor(key))
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


def build_params(state: Mapping[str, np.ndarray], config: LosatokConfig) -> dict:
    """Checks `state` against `config` and returns the Flax parameter tree."""
    problems = mapping.config_disagreements(mapping.infer_config(state, config.semantic.num_heads),
                                            config)
    problems += mapping.check_buffers(state, config)
    try:
        flat = mapping.to_flax(state)
    except mapping.MappingError as e:
        raise ConversionError("; ".join(problems + [str(e)])) from None
    expected = {"/".join(k): v for k, v in
                flatten_dict(checkpoint.abstract_params(config)).items()}
    for path in sorted(set(expected) - set(flat)):
        problems.append(f"missing key {_upstream_name(tuple(path.split('/')))}")
    for path in sorted(set(flat) - set(expected)):
        problems.append(f"unexpected key {_upstream_name(tuple(path.split('/')))}")
    for path in sorted(set(flat) & set(expected)):
        if flat[path].shape != expected[path].shape:
            problems.append(f"shape mismatch at {_upstream_name(tuple(path.split('/')))}: "
                            f"converted {flat[path].shape}, model expects {expected[path].shape}")
    if problems:
        raise ConversionError("checkpoint does not match the config:\n  " + "\n  ".join(problems))
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def convert(config_path, model_path, output_dir, semantic_encoder_path=None) -> LosatokConfig:
    config = from_upstream_yaml(config_path)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"{output_dir} exists and is not empty; choose a new directory")
    state = read_torch_state(model_path)
    if semantic_encoder_path is not None:
        state.update(read_semantic_source(semantic_encoder_path))
    params = build_params(state, config)
    checkpoint.save(output_dir, Losatok(params, config))
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_path", required=True, help="upstream YAML config")
    parser.add_argument("--model_path", required=True, help="upstream LoSATok .pth checkpoint")
    parser.add_argument("--semantic_encoder_path", default=None,
                        help="semantic_encoder.pth, or a MiDashengLM safetensors folder")
    parser.add_argument("--output_dir", required=True, help="new directory for the checkpoint")
    args = parser.parse_args(argv)
    try:
        config = convert(args.config_path, args.model_path, args.output_dir,
                         args.semantic_encoder_path)
    except (ConversionError, ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}")
    print(json.dumps(config.to_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
