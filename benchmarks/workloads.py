"""What the benchmarks run: model sizes, profiles, buckets, weights, inputs and the FLOPs they
need (counted analytically)."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
# The tests' PyTorch oracle and test signals serve the benchmarks too.
sys.path.insert(0, str(REPO_ROOT / "tests"))

from signals import noise_clip  # noqa: E402
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "losatok-bench"
SAMPLE_RATE = 16000

# Model sizes, as `tests/torch_oracle.random_state_dict` keywords plus the number of heads.
FULL_SIZES = dict(embed_dim=1280, depth=32, num_heads=16, target_length=1008, decoder_dim=128,
                  decoder_embed_dim=1280, decoder_intermediate_size=5120, decoder_depth=12)
TINY_SIZES = dict(embed_dim=64, depth=2, num_heads=4, target_length=40, decoder_dim=16,
                  decoder_embed_dim=64, decoder_intermediate_size=128, decoder_depth=2)


@dataclasses.dataclass(frozen=True)
class Profile:
    sizes: dict
    durations: tuple[float, ...]  # single clips, seconds
    mixed_clips: int  # clips in the mixed-length batch
    mixed_range: tuple[float, float]  # their durations, seconds
    repeats: int  # timed calls after the first
    matmul_n: int  # side of the square matmul that measures the peak (CPU; GPU uses 8192)


PROFILES = {
    "full": Profile(FULL_SIZES, (1.0, 10.0, 60.0), 8, (1.0, 12.0), 5, 4096),
    "quick": Profile(FULL_SIZES, (1.0, 10.0), 4, (1.0, 12.0), 3, 4096),
    "tiny": Profile(TINY_SIZES, (1.0, 2.0), 3, (0.5, 2.5), 2, 1024),
}
OPERATIONS = ("encode", "decode", "reconstruct")
NOT_MEASURED_GPU = "not measured (no GPU)"
# `--buckets`: JAX's shape buckets. "default" is `losatok_jax.DEFAULT_BUCKETS` (16-1512 tokens in
# steps of about 1.25); "powers-of-two" is the coarser 32, 64, ..., 512, 1008 ladder (fewer
# programs, more padding); "per-second" has one length bucket per second of audio up to a minute
# (programs compile on demand, ~1 s each at full size on CPU), so a row is padded by < 1 s.
BUCKET_CHOICES = ("default", "powers-of-two", "per-second")


def make_buckets(name: str):
    from losatok_jax import DEFAULT_BUCKETS, Buckets

    if name == "default":
        return DEFAULT_BUCKETS
    if name == "powers-of-two":
        return Buckets(batch_sizes=DEFAULT_BUCKETS.batch_sizes,
                       num_tokens=(32, 64, 128, 256, 512, 1008))
    if name == "per-second":
        return Buckets(batch_sizes=(1, 2, 4, 8), num_tokens=tuple(range(25, 1501, 25)))
    raise ValueError(f"unknown buckets {name!r}; choose from {BUCKET_CHOICES}")


# --------------------------------------------------------------------------------------------
# Configuration, weights, inputs
# --------------------------------------------------------------------------------------------

def make_config(sizes: dict):
    from losatok_jax.config import LosatokConfig, SemanticEncoderConfig

    semantic = SemanticEncoderConfig(embed_dim=sizes["embed_dim"], depth=sizes["depth"],
                                     num_heads=sizes["num_heads"],
                                     target_length=sizes["target_length"])
    return LosatokConfig(embed_dim=sizes["embed_dim"], decoder_dim=sizes["decoder_dim"],
                         decoder_embed_dim=sizes["decoder_embed_dim"],
                         decoder_intermediate_size=sizes["decoder_intermediate_size"],
                         decoder_depth=sizes["decoder_depth"], semantic=semantic)


def _oracle_module():
    import torch_oracle

    return torch_oracle


def weights_file(sizes: dict, seed: int, cache_dir: Path) -> Path:
    """A random upstream state dict saved as .pth, generated once per (sizes, seed) and reused:
    generating the full-size one takes over a minute on 2 cores."""
    import torch

    tag = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()) if k != "num_heads")
    path = cache_dir / f"weights-{tag}-seed{seed}.pth"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    oracle = _oracle_module()
    keywords = {k: v for k, v in sizes.items() if k != "num_heads"}
    state = oracle.random_state_dict(**keywords, seed=seed)
    temp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, temp)
    temp.rename(path)
    return path


def mixed_durations(count: int, duration_range: tuple[float, float]) -> np.ndarray:
    """The mixed batch's clip durations in seconds: uniform over the range, one fixed seed."""
    return np.random.default_rng(1234).uniform(*duration_range, count)


def timing_inputs(profile: Profile) -> list[tuple[str, Any]]:
    """(label, clip or list of clips) for every input of the profile (no batch row for 0 mixed
    clips)."""
    inputs = [(f"{d:g} s", noise_clip(d, seed=i)) for i, d in enumerate(profile.durations)]
    if not profile.mixed_clips:
        return inputs
    lengths = mixed_durations(profile.mixed_clips, profile.mixed_range)
    clips = [noise_clip(d, seed=100 + i) for i, d in enumerate(lengths)]
    inputs.append((f"batch of {len(clips)} mixed ({profile.mixed_range[0]:g}-"
                   f"{profile.mixed_range[1]:g} s)", clips))
    return inputs


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def row_flops(config, operation: str, clips: list[np.ndarray]) -> float:
    from losatok_jax.plan import decode_flops, encode_flops

    total = 0.0
    for clip in clips:
        if operation in ("encode", "reconstruct"):
            total += encode_flops(config, len(clip))
        if operation in ("decode", "reconstruct"):
            total += decode_flops(config, config.num_tokens(len(clip)))
    return total


def jax_tokens_computed(config, operation: str, tokens: int, b=None) -> int | None:
    """Tokens the buckets `b` (default: the default ones) make JAX compute for one clip of
    `tokens` (padding and decoder halos included), or None when unknown; upstream computes
    exactly `tokens`."""
    from losatok_jax import DEFAULT_BUCKETS
    from losatok_jax._batching import encode_pieces, plan_decode_rows

    b = b or DEFAULT_BUCKETS
    if operation == "encode":
        return sum(b.encode_length(config, p.count) for p in encode_pieces(config, 0, tokens))
    if operation == "decode":
        return sum(row.length for row in plan_decode_rows(config, b, [tokens]))
    return None


def child_env(device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env
