"""Shared fixtures: golden checkpoints and random state dicts, converted by the real converter.

Every model the tests use goes through `losatok_jax.convert.main` and `load_losatok`, so the
equivalence tests cover the converter and the Orbax round trip as well as the model. Conversions
are cached per session: JAX compiles per input shape, not per parameter values, so tests share
models and shapes to keep the suite fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # `import torch_oracle` and `from conftest import ...`

import losatok_jax  # noqa: E402
from losatok_jax import _programs, convert  # noqa: E402
from losatok_jax.runners import CPU_MATMUL_ROWS  # noqa: E402

GOLDEN_DIR = TESTS_DIR / "data" / "golden"
GOLDEN_CASES = ("tiny_chunk40", "tiny_chunk1008")

# Sizes of the golden tiny_chunk40 model, the default shape of random test models.
TINY_SIZES = dict(embed_dim=64, depth=2, num_heads=4, target_length=40, decoder_dim=16,
                  decoder_embed_dim=64, decoder_intermediate_size=128, decoder_depth=2)


def write_upstream_config(path: Path, *, embed_dim: int, depth: int, num_heads: int,
                          target_length: int, decoder_dim: int, decoder_embed_dim: int,
                          decoder_intermediate_size: int, decoder_depth: int,
                          init_values: float | None = None, qkv_bias: bool = True) -> Path:
    """Writes an upstream-format YAML (as in tests/data/golden/*/config.yml) for a test model."""
    config = {
        "sample_rate": 16000,
        "AudioVAE.sample_rate": 16000,
        "AudioVAE.config_dict": {
            "decoder_depth": decoder_depth, "decoder_embed_dim": decoder_embed_dim,
            "decoder_dim": decoder_dim, "decoder_intermediate_size": decoder_intermediate_size,
            "depth": 1, "dtype": "float32", "embed_dim": embed_dim, "hop_length": 160,
            "istft_hop": 320, "istft_n_fft": 1280, "model_type": "dashengtokenizer",
            "n_mels_patch": 128, "num_heads": 4, "transformers_version": "5.1.0",
            "upsample_tokens": 2,
        },
        "AudioVAE.semantic_encoder_path": "semantic_encoder.pth",
        "semantic_encoder_config": {
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "target_length": target_length, "init_values": init_values, "qkv_bias": qkv_bias,
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_converter(config_path, model_path, output_dir, semantic_encoder_path=None) -> int:
    """`losatok_jax.convert.main` with the command-line flags a user would pass."""
    argv = ["--config_path", str(config_path), "--model_path", str(model_path),
            "--output_dir", str(output_dir)]
    if semantic_encoder_path is not None:
        argv += ["--semantic_encoder_path", str(semantic_encoder_path)]
    return convert.main(argv)


def in_out_kernels(tree: dict) -> dict:
    """Every linear `weight` (out, in) as the (in, out) `kernel` Flax's Dense holds (and this
    package stored before its checkpoints took PyTorch's layout); stacked weights too."""
    converted = {}
    for key, value in tree.items():
        if key == "weight":
            converted["kernel"] = np.swapaxes(np.asarray(value), -1, -2)
        else:
            converted[key] = in_out_kernels(value) if isinstance(value, dict) else value
    return converted


def broadband_audio(batch: int, num_samples: int, seed: int) -> np.ndarray:
    """Coloured Gaussian noise with a slow amplitude modulation, peak 0.1, float32 (B, N).

    Broadband on purpose: on tonal audio float32 STFT rounding alone exceeds the tight
    tolerances (docs/architecture.md, "Conditioning"). The spectral shape (a tilt plus ripple, within about
    ±15 dB) has no nulls, and the modulation keeps the envelope non-stationary without silence.
    """
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal((batch, num_samples)))
    freq = np.linspace(0.0, 1.0, spectrum.shape[-1])
    shape_db = (rng.uniform(-9, 6, (batch, 1)) * freq
                + 3 * np.sin(2 * np.pi * rng.uniform(1, 4, (batch, 1)) * freq
                             + rng.uniform(0, 2 * np.pi, (batch, 1))))
    coloured = np.fft.irfft(spectrum * 10 ** (shape_db / 20), n=num_samples)
    t = np.arange(num_samples) / 16000
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1, 5, (batch, 1)) * t)
    signal = coloured * envelope
    return (0.1 * signal / np.abs(signal).max(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def golden_checkpoint(tmp_path_factory):
    """(case, with_semantic_encoder) -> converted checkpoint dir, converted once per session."""
    converted: dict[tuple[str, bool], Path] = {}

    def get(case: str, with_semantic_encoder: bool = False) -> Path:
        key = (case, with_semantic_encoder)
        if key not in converted:
            case_dir = GOLDEN_DIR / case
            output_dir = tmp_path_factory.mktemp(f"{case}-semantic{int(with_semantic_encoder)}")
            semantic = case_dir / "semantic_encoder.pth" if with_semantic_encoder else None
            status = run_converter(case_dir / "config.yml", case_dir / "losatok.pth",
                                   output_dir / "ckpt", semantic)
            assert status == 0, f"converting golden case {case} failed"
            converted[key] = output_dir / "ckpt"
        return converted[key]

    return get


@pytest.fixture(scope="session")
def golden_model(golden_checkpoint):
    """(case, with_semantic_encoder) -> loaded `Losatok`, loaded once per session."""
    loaded: dict[tuple[str, bool], losatok_jax.Losatok] = {}

    def get(case: str, with_semantic_encoder: bool = False) -> losatok_jax.Losatok:
        key = (case, with_semantic_encoder)
        if key not in loaded:
            loaded[key] = losatok_jax.load_losatok(golden_checkpoint(case, with_semantic_encoder))
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def model_from_state_dict(tmp_path_factory):
    """(torch state dict, config sizes) -> loaded `Losatok`, via a .pth file and the converter.

    Sizes are `write_upstream_config` keywords; the state dict must agree with them (the
    converter checks that).
    """
    def convert(state: dict[str, torch.Tensor], **sizes) -> losatok_jax.Losatok:
        workdir = tmp_path_factory.mktemp("random")
        torch.save(state, workdir / "losatok.pth")
        config_path = write_upstream_config(workdir / "config.yml", **sizes)
        status = run_converter(config_path, workdir / "losatok.pth", workdir / "ckpt")
        assert status == 0, f"converting a random state dict with {sizes} failed"
        return losatok_jax.load_losatok(workdir / "ckpt")

    return convert


@pytest.fixture(scope="session")
def golden_vectors():
    """case -> the arrays of its vectors.npz."""
    return {case: dict(np.load(GOLDEN_DIR / case / "vectors.npz")) for case in GOLDEN_CASES}


@pytest.fixture(scope="session")
def checkpoint(golden_checkpoint):
    """The tiny_chunk40 golden model converted: the default checkpoint of the CLI tests."""
    return golden_checkpoint("tiny_chunk40")


@pytest.fixture(scope="session")
def model(golden_model):
    """The tiny_chunk40 golden model loaded: the default model of the API tests."""
    return golden_model("tiny_chunk40")


def layer_inputs(config, stack: str, rows: int):
    """One batch of `rows` rows as the model runs them: encoder rows in semantic chunks (a batch
    of `rows / chunk_tokens` chunks where that divides), decoder rows as one sequence."""
    if stack == "semantic":
        chunk = config.semantic.chunk_tokens
        shape = (rows // chunk, chunk) if rows > chunk and rows % chunk == 0 else (1, rows)
        x = jax.random.normal(jax.random.key(0), (*shape, config.semantic.embed_dim))
        return x, jnp.ones(shape, bool)
    x = jax.random.normal(jax.random.key(0), (1, rows, config.decoder_embed_dim))
    return x, jnp.ones((1, rows, 1))


def lowered_layer(model, stack: str, rows: int):
    """The CPU Runner's per-layer program for one layer of `stack` on `rows` rows, lowered."""
    c = model.config
    x, mask = layer_inputs(c, stack, rows)
    weights = losatok_jax.Runner(model).layers[stack][0]
    return _programs.apply_layer.lower(weights, x, mask, config=c, dtype=model.dtype,
                                       stack=stack, max_rows=CPU_MATMUL_ROWS)


def lowered_layers(model):
    """Both stacks' per-layer programs."""
    return [lowered_layer(model, stack, 8) for stack in ("semantic", "decoder")]
