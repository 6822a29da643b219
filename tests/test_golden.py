"""The converted golden checkpoints reproduce every upstream PyTorch array the port produces.

Each case is converted from `losatok.pth` alone and with `--semantic_encoder_path
semantic_encoder.pth` (the semantic tensors then come from the second file), loaded from the
Orbax directory, and run through the public API. Run with `-s` to see the max|Δ| table.
"""

import numpy as np
import pytest

import losatok_jax
from helpers import GOLDEN_CASES, TOLERANCES

# Arrays in vectors.npz that are inputs or training losses, not outputs of the inference port.
NOT_PRODUCED = {"audio", "z_random", "kl_clamp", "kl_loss", "semantic_loss_both",
                "sembo_mse_loss", "sembo_relation_loss"}
SOURCES = {False: "losatok.pth", True: "+semantic_encoder.pth"}
RUNS = [(case, with_semantic) for case in GOLDEN_CASES for with_semantic in SOURCES]


def _port_outputs(model: losatok_jax.Losatok, golden: dict) -> dict[str, np.ndarray]:
    """Every golden array computed by the port, from the same inputs upstream used."""
    features = losatok_jax.encode(model, golden["audio"])
    semantic_logmel, acoustic_logmel = losatok_jax.log_mels(model, golden["audio"])
    outputs = dict(features)
    outputs.update(
        semantic_logmel=semantic_logmel,
        acoustic_logmel=acoustic_logmel,
        semantic_encoder_out=features["semantic_emb"],  # T is the same for both branches here
        recon_audio=losatok_jax.api.decode(model, golden["mu"]),
        decode_z_random=losatok_jax.api.decode(model, golden["z_random"]),
        sembo_recon=model.apply(golden["semantic_emb"], method="sembo_recon"),
    )
    return {name: np.asarray(value) for name, value in outputs.items()}


@pytest.fixture(scope="module")
def error_table():
    """Collects max|Δ| per (case, source, array) and prints the table at the end (`-s`)."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    yield table
    runs = sorted(table)
    print("\n\ngolden max|Δ| (port vs upstream float32)")
    print(f"{'array':22s}" + "".join(f"{case + ' ' + source:>36s}" for case, source in runs))
    for name in sorted(TOLERANCES):
        print(f"{name:22s}" + "".join(f"{table[run].get(name, float('nan')):36.2e}"
                                      for run in runs))


@pytest.fixture(scope="module", params=RUNS, ids=[f"{c}-{SOURCES[s]}" for c, s in RUNS])
def golden_run(request, golden_model, golden_vectors):
    case, with_semantic = request.param
    golden = golden_vectors[case]
    outputs = _port_outputs(golden_model(case, with_semantic), golden)
    return (case, SOURCES[with_semantic]), outputs, golden


def test_every_output_array_is_compared(golden_vectors):
    for case, golden in golden_vectors.items():
        assert set(golden) - NOT_PRODUCED == set(TOLERANCES), case


@pytest.mark.parametrize("name", sorted(TOLERANCES))
def test_matches_golden(golden_run, name, error_table):
    run, outputs, golden = golden_run
    assert outputs[name].shape == golden[name].shape, name
    err = float(np.abs(outputs[name] - golden[name]).max())
    error_table.setdefault(run, {})[name] = err
    print(f"{run[0]} {run[1]} {name}: max|Δ| = {err:.2e}")
    assert err <= TOLERANCES[name], f"{run}: {name} max|Δ| {err:.3e} > {TOLERANCES[name]:g}"
