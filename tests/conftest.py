"""Shared fixtures: golden checkpoints and random state dicts, converted by the real converter.

Every model the tests use goes through `losatok_jax.convert.main` and `load_losatok`, so the
equivalence tests cover the converter and the Orbax round trip as well as the model. Conversions
are cached per session: JAX compiles per input shape, not per parameter values, so tests share
models and shapes to keep the suite fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # `import helpers`, `import torch_oracle`, ...

import losatok_jax  # noqa: E402
from helpers import GOLDEN_CASES, GOLDEN_DIR, run_converter, write_upstream_config  # noqa: E402


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
