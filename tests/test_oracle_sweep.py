"""Randomized JAX-vs-oracle sweep over lengths, batch sizes and encoder variants.

Random upstream-layout state dicts (torch_oracle.random_state_dict) go through the real converter;
the port is compared with the float64 PyTorch oracle. Lengths cover the 513-sample minimum, frame
counts not divisible by 4, semantic chunk boundaries ±1 token (a 40-frame chunk of 10 tokens, and
the real 1008-frame chunk of 252 tokens) and 30 s clips, encoded whole and, with small length
buckets, in windows (the streaming path for long clips). Every case compiles its own shapes, so the
list is kept short on purpose. Run with `-s` for the worst max|Δ| per array.
"""

from typing import NamedTuple

import numpy as np
import pytest

import losatok_jax
import torch_oracle
from helpers import TINY_SIZES, broadband_audio

EMBEDDING_TOL, AUDIO_TOL, LOGMEL_TOL = 1e-4, 1e-5, 1e-3
TOLERANCES = {
    **{name: EMBEDDING_TOL for name in losatok_jax.FEATURE_KEYS},
    "semantic_logmel": LOGMEL_TOL,
    "acoustic_logmel": LOGMEL_TOL,
    "decoded_audio": AUDIO_TOL,
}


class Case(NamedTuple):
    batch: int
    num_samples: int
    target_length: int = 40
    layer_scale: bool = False
    qkv_bias: bool = True
    num_heads: int = 4
    buckets: losatok_jax.Buckets = losatok_jax.DEFAULT_BUCKETS

    @property
    def frames(self) -> int:
        return 1 + self.num_samples // 160

    @property
    def tokens(self) -> int:
        return self.frames // 4


# Comments give frames F and tokens T; a 40-frame chunk holds 10 tokens, a 1008-frame one 252.
CASES = {
    "min-513": Case(1, 513),  # F=4, T=1: the shortest valid input
    "chunk-1token": Case(2, 6000, layer_scale=True),  # F=38, T=9
    "chunk-exact": Case(3, 6400, qkv_bias=False),  # F=41, T=10: exactly one chunk
    "chunk+1token": Case(4, 7041, layer_scale=True, qkv_bias=False),  # F=45, T=11
    "2chunks-exact": Case(2, 13000),  # F=82, T=20
    "2chunks+1token": Case(1, 13500, layer_scale=True),  # F=85, T=21
    "30s-chunk40": Case(1, 480000, qkv_bias=False),  # F=3001, T=750: 75 chunks
    "real-chunk-1token": Case(2, 161000, target_length=1008, num_heads=8),  # F=1007, T=251
    "real-chunk+1token": Case(2, 161925, target_length=1008, layer_scale=True,
                              num_heads=8),  # F=1013, T=253
    "30s-real-chunk": Case(1, 479999, target_length=1008, qkv_bias=False,
                           num_heads=8),  # F=3000, T=750: 2 full chunks + 246 tokens
    # Windows of 200 tokens (20 chunks) to encode, 200 minus a halo to decode.
    "30s-chunk40-windowed": Case(2, 480000, layer_scale=True,
                                 buckets=losatok_jax.Buckets(num_tokens=(64, 200))),
    # Windows of 2 real chunks; the last one holds 246 tokens.
    "30s-real-chunk-windowed": Case(1, 479999, target_length=1008, qkv_bias=False, num_heads=8,
                                    buckets=losatok_jax.Buckets(num_tokens=(256, 504))),
}


def test_cases_cover_the_boundaries():
    """Guards the case table: the frame and token counts it claims are the ones it gets."""
    tokens = {name: case.tokens for name, case in CASES.items()}
    assert tokens["min-513"] == 1
    assert [tokens[n] for n in ("chunk-1token", "chunk-exact", "chunk+1token")] == [9, 10, 11]
    assert [tokens[n] for n in ("2chunks-exact", "2chunks+1token")] == [20, 21]
    assert [tokens[n] for n in ("real-chunk-1token", "real-chunk+1token")] == [251, 253]
    assert min(c.num_samples for c in CASES.values()) == 513
    assert max(c.num_samples for c in CASES.values()) == 480000
    assert any(c.frames % 4 for c in CASES.values())
    assert {c.batch for c in CASES.values()} == {1, 2, 3, 4}
    windowed = [c for c in CASES.values() if c.tokens > c.buckets.max_tokens]
    assert {c.target_length for c in windowed} == {40, 1008}
    assert {(c.layer_scale, c.qkv_bias) for c in CASES.values()} == {
        (False, True), (True, True), (False, False), (True, False)}


@pytest.fixture(scope="module")
def worst_errors():
    """Worst max|Δ| per array over the whole sweep, printed at the end (`-s`)."""
    worst: dict[str, tuple[float, str]] = {}
    yield worst
    print("\n\noracle sweep: worst max|Δ| per array (port float32 vs oracle float64)")
    for name in sorted(worst):
        err, case = worst[name]
        print(f"  {name:18s} {err:.2e}  ({case})  tolerance {TOLERANCES[name]:g}")


@pytest.fixture(scope="module")
def random_model(model_from_state_dict):
    """Case -> (port model, oracle); one random checkpoint per encoder variant."""
    built = {}

    def get(case: Case):
        key = (case.target_length, case.layer_scale, case.qkv_bias, case.num_heads)
        if key not in built:
            sizes = {**TINY_SIZES, "target_length": case.target_length,
                     "num_heads": case.num_heads}
            state = torch_oracle.random_state_dict(
                **{k: v for k, v in sizes.items() if k != "num_heads"},
                layer_scale=case.layer_scale, qkv_bias=case.qkv_bias,
                seed=case.target_length + 2 * case.layer_scale + case.qkv_bias)
            model = model_from_state_dict(
                state, **sizes, init_values=0.1 if case.layer_scale else None,
                qkv_bias=case.qkv_bias)
            built[key] = model, torch_oracle.TorchOracle(state, num_heads=case.num_heads)
        return built[key]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_port_matches_oracle(name, random_model, worst_errors):
    case = CASES[name]
    model, oracle = random_model(case)
    audio = broadband_audio(case.batch, case.num_samples, seed=case.num_samples)

    features = {k: np.asarray(v)
                for k, v in losatok_jax.encode(model, audio, buckets=case.buckets).items()}
    semantic_logmel, acoustic_logmel = losatok_jax.log_mels(model, audio)
    ours = {**features, "semantic_logmel": np.asarray(semantic_logmel),
            "acoustic_logmel": np.asarray(acoustic_logmel),
            "decoded_audio": np.asarray(losatok_jax.api.decode(model, features["z"],
                                                           buckets=case.buckets))}
    reference = oracle.encode(audio)
    # Both decoders get the port's z, so the audio comparison isolates the decoder.
    reference["decoded_audio"] = oracle.decode(np.array(features["z"]))

    assert features["z"].shape == (case.batch, case.tokens, TINY_SIZES["decoder_dim"])
    assert ours["decoded_audio"].shape == (case.batch, 640 * case.tokens)
    errors = {}
    for array, tolerance in TOLERANCES.items():
        assert ours[array].shape == reference[array].shape, array
        errors[array] = float(np.abs(ours[array] - reference[array]).max())
        if errors[array] > worst_errors.get(array, (-1.0, ""))[0]:
            worst_errors[array] = errors[array], name
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    failures = {k: v for k, v in errors.items() if v > TOLERANCES[k]}
    assert not failures, f"{name}: max|Δ| above tolerance: {failures}"
