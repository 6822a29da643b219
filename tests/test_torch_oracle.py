"""Validates the independent PyTorch oracle against the upstream golden vectors.

Once it reproduces upstream on the golden cases, the oracle can stand in for upstream on
configurations the golden files do not cover (LayerScale, no qkv bias, other lengths).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_oracle import (  # noqa: E402
    ACOUSTIC_FB_KEY,
    ACOUSTIC_WINDOW_KEY,
    ISTFT_WINDOW_KEY,
    TorchOracle,
    golden_oracle,
    load_state_dict,
    random_state_dict,
)

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
CASES = ["tiny_chunk40", "tiny_chunk1008"]

EMBEDDING_TOL, AUDIO_TOL, LOGMEL_TOL = 1e-4, 1e-5, 1e-3
TOLERANCES = {
    **{name: EMBEDDING_TOL for name in [
        "z", "mu", "logvar", "semantic_emb", "acoustic_emb", "unified_emb",
        "semantic_emb_low", "acoustic_emb_low", "unified_emb_low",
        "semantic_encoder_out", "sembo_recon"]},
    "recon_audio": AUDIO_TOL,
    "decode_z_random": AUDIO_TOL,
    "semantic_logmel": LOGMEL_TOL,  # golden includes the 120 dB floor, so compare directly
    "acoustic_logmel": LOGMEL_TOL,
}

# Same sizes as tiny_chunk40, so its checkpoint pins down the expected keys and shapes.
TINY_CONFIG = dict(embed_dim=64, depth=2, target_length=40, decoder_dim=16,
                   decoder_embed_dim=64, decoder_intermediate_size=128, decoder_depth=2)
TINY_HEADS = 4


@pytest.fixture(scope="module", params=[(c, d) for c in CASES for d in ("float64", "float32")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def golden_run(request):
    """Oracle outputs for every golden array it can produce, plus the golden vectors."""
    case, dtype = request.param
    golden = dict(np.load(GOLDEN / case / "vectors.npz"))
    oracle = golden_oracle(GOLDEN / case, dtype=getattr(torch, dtype))
    outputs = oracle.encode(golden["audio"])
    outputs["recon_audio"] = oracle.decode(golden["mu"])
    outputs["decode_z_random"] = oracle.decode(golden["z_random"])
    outputs["sembo_recon"] = oracle.sembo_recon(golden["semantic_emb"])
    return outputs, golden


@pytest.mark.parametrize("name", sorted(TOLERANCES))
def test_matches_golden(golden_run, name):
    outputs, golden = golden_run
    assert outputs[name].shape == golden[name].shape
    err = np.abs(outputs[name] - golden[name]).max()
    assert err <= TOLERANCES[name], f"{name}: max|diff| {err:.3e}"


def test_encode_returns_exactly_the_documented_outputs(golden_run):
    outputs, _ = golden_run
    encode_names = set(outputs) - {"recon_audio", "decode_z_random", "sembo_recon"}
    assert encode_names == {
        "z", "mu", "logvar", "semantic_emb", "acoustic_emb", "unified_emb",
        "semantic_emb_low", "acoustic_emb_low", "unified_emb_low",
        "semantic_logmel", "acoustic_logmel", "semantic_encoder_out"}
    np.testing.assert_array_equal(outputs["z"], outputs["mu"])


def _tiny_state_dict(**overrides):
    return random_state_dict(**{**TINY_CONFIG, **overrides})


def test_random_state_dict_matches_golden_layout():
    golden = load_state_dict(GOLDEN / "tiny_chunk40" / "losatok.pth")
    generated = _tiny_state_dict()
    assert set(generated) == set(golden)
    for key, tensor in golden.items():
        assert generated[key].shape == tensor.shape, key
        assert generated[key].dtype == tensor.dtype, key


@pytest.mark.parametrize("key", [ACOUSTIC_WINDOW_KEY, ACOUSTIC_FB_KEY, ISTFT_WINDOW_KEY])
def test_random_state_dict_buffers_equal_golden(key):
    golden = load_state_dict(GOLDEN / "tiny_chunk40" / "losatok.pth")
    assert (_tiny_state_dict()[key] - golden[key]).abs().max() <= 1e-6


@pytest.mark.parametrize("layer_scale", [False, True])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_random_state_dict_round_trip(layer_scale, qkv_bias):
    state = _tiny_state_dict(layer_scale=layer_scale, qkv_bias=qkv_bias, seed=3)
    depth = TINY_CONFIG["depth"]
    for i in range(depth):
        block = f"semantic_encoder.encoder.blocks.{i}."
        assert (block + "ls1.gamma" in state) == layer_scale
        assert (block + "ls2.gamma" in state) == layer_scale
        assert (block + "attn.qkv.bias" in state) == qkv_bias

    oracle = TorchOracle(state, num_heads=TINY_HEADS)
    audio = 0.1 * np.random.default_rng(0).standard_normal((2, 16000))
    F = 1 + 16000 // 160
    T = F // 4
    E, D = TINY_CONFIG["embed_dim"], TINY_CONFIG["decoder_dim"]
    out = oracle.encode(audio)
    expected_shapes = {
        "semantic_logmel": (2, 64, F), "acoustic_logmel": (2, 128, F),
        "semantic_encoder_out": (2, T, E), "semantic_emb": (2, T, E),
        "acoustic_emb": (2, T, E), "unified_emb": (2, T, E),
        "semantic_emb_low": (2, T, D), "acoustic_emb_low": (2, T, D),
        "unified_emb_low": (2, T, D), "mu": (2, T, D), "logvar": (2, T, D), "z": (2, T, D),
    }
    assert {k: v.shape for k, v in out.items()} == expected_shapes
    assert all(np.isfinite(v).all() for v in out.values())
    assert np.abs(out["mu"]).max() < 20  # well-conditioned, far from any clip
    audio_out = oracle.decode(out["z"])
    assert audio_out.shape == (2, 640 * T)
    assert np.isfinite(audio_out).all() and 0 < np.abs(audio_out).max() < 100
    assert oracle.sembo_recon(out["semantic_emb"]).shape == (2, T, E)


def test_unit_layer_scale_equals_no_layer_scale():
    """Guards LayerScale detection: gamma = 1 must reproduce the key-less encoder."""
    with_ls = _tiny_state_dict(layer_scale=True)
    for key in with_ls:
        if key.endswith(("ls1.gamma", "ls2.gamma")):
            with_ls[key] = torch.ones_like(with_ls[key])
    without_ls = {k: v for k, v in with_ls.items() if ".ls" not in k}
    audio = 0.1 * np.random.default_rng(1).standard_normal((1, 8000))
    a = TorchOracle(with_ls, num_heads=TINY_HEADS).encode(audio)["semantic_emb"]
    b = TorchOracle(without_ls, num_heads=TINY_HEADS).encode(audio)["semantic_emb"]
    np.testing.assert_array_equal(a, b)


def test_zero_qkv_bias_equals_no_qkv_bias():
    with_bias = _tiny_state_dict(qkv_bias=True)
    for key in with_bias:
        if key.endswith("attn.qkv.bias"):
            with_bias[key] = torch.zeros_like(with_bias[key])
    without_bias = {k: v for k, v in with_bias.items() if not k.endswith("attn.qkv.bias")}
    audio = 0.1 * np.random.default_rng(2).standard_normal((1, 8000))
    a = TorchOracle(with_bias, num_heads=TINY_HEADS).encode(audio)["semantic_emb"]
    b = TorchOracle(without_bias, num_heads=TINY_HEADS).encode(audio)["semantic_emb"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_rejects_too_short_audio():
    oracle = TorchOracle(_tiny_state_dict(), num_heads=TINY_HEADS)
    with pytest.raises(ValueError):
        oracle.encode(np.zeros((1, 512)))
    assert oracle.encode(np.zeros((1, 513)))["z"].shape == (1, 1, TINY_CONFIG["decoder_dim"])
