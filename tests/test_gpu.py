"""What only a GPU can show: float32 equivalence with upstream computed on the GPU, and bfloat16
attention through cuDNN's fused kernel.

Skipped without a CUDA GPU. On CPU the same programs run in test_golden.py and test_bf16.py, and
test_api.py checks that every float32 matmul in them asks for full precision.
"""

import jax
import numpy as np
import pytest

import losatok_jax
from helpers import GOLDEN_CASES
from helpers import TOLERANCES


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _gpu()
pytestmark = pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU; on CPU test_golden.py, "
                                "test_bf16.py and test_api.py cover the same programs")
CHECKED = ("z", "semantic_emb", "acoustic_emb", "unified_emb")


def _on_gpu(model):
    return jax.device_put(model, GPU)


def _max_errors(model, golden) -> dict[str, float]:
    features = losatok_jax.encode(model, golden["audio"])
    errors = {key: float(np.abs(features[key] - golden[key]).max()) for key in CHECKED}
    audio = losatok_jax.api.decode(model, golden["mu"])
    errors["recon_audio"] = float(np.abs(audio - golden["recon_audio"]).max())
    return errors


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_float32_on_the_gpu_matches_upstream(golden_model, golden_vectors, case):
    model = _on_gpu(golden_model(case))
    assert {d.platform for leaf in jax.tree.leaves(model.params) for d in leaf.devices()} == {"gpu"}
    errors = _max_errors(model, golden_vectors[case])
    with jax.default_matmul_precision("tensorfloat32"):
        tf32 = _max_errors(model, golden_vectors[case])
    print(f"{case}: max|Δ| full float32 {errors}; with TF32 matmuls {tf32}")
    for key, err in errors.items():
        assert err <= TOLERANCES[key], f"{key}: max|Δ| {err:.3e} > {TOLERANCES[key]:g}"


def test_bfloat16_attention_runs_cudnn_fused_kernel(golden_model, golden_vectors):
    model32 = _on_gpu(golden_model("tiny_chunk40"))
    model16 = model32.astype("bfloat16")
    audio = golden_vectors["tiny_chunk40"]["audio"]
    compiled = jax.jit(lambda m, x: losatok_jax.encode(m, x)["z"]).lower(model16, audio).compile()
    assert "cudnn" in compiled.as_text().lower() and "fmha" in compiled.as_text().lower()
    z16 = np.asarray(compiled(model16, audio))
    z32 = np.asarray(losatok_jax.encode(model32, audio)["z"])
    cosine = (z16 * z32).sum(-1) / np.linalg.norm(z16, axis=-1) / np.linalg.norm(z32, axis=-1)
    assert cosine.min() >= 0.99, cosine.min()
