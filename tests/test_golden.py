"""The converted golden checkpoints reproduce every upstream PyTorch array the port produces.

Each case is converted from `losatok.pth` alone and with `--semantic_encoder_path
semantic_encoder.pth` (the semantic tensors then come from the second file), loaded from the
Orbax directory, and run through the public API. Run with `-s` to see the max|Δ| table.
"""

import numpy as np
import pytest

import losatok_jax
from conftest import GOLDEN_CASES, GOLDEN_DIR, in_out_kernels
from losatok_jax import ConfigError, LosatokConfig, checkpoint, load_config

EMBEDDING_TOL, AUDIO_TOL, LOGMEL_TOL = 1e-4, 1e-5, 1e-3
TOLERANCES = {
    **{name: EMBEDDING_TOL for name in (*losatok_jax.FEATURE_KEYS, "semantic_encoder_out",
                                        "sembo_recon")},
    "semantic_logmel": LOGMEL_TOL,
    "acoustic_logmel": LOGMEL_TOL,
    "recon_audio": AUDIO_TOL,
    "decode_z_random": AUDIO_TOL,
}
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
        recon_audio=losatok_jax.decode(model, golden["mu"]),
        decode_z_random=losatok_jax.decode(model, golden["z_random"]),
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


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_stored_config_equals_yaml(case, golden_checkpoint):
    stored = LosatokConfig.from_json((golden_checkpoint(case) / "config.json").read_text())
    assert stored == load_config(GOLDEN_DIR / case / "config.yml")


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_load_with_the_same_yaml(case, golden_checkpoint, golden_model):
    model = losatok_jax.load_losatok(golden_checkpoint(case),
                                     config_path=GOLDEN_DIR / case / "config.yml")
    assert model.config == golden_model(case).config


def test_load_with_a_different_yaml_raises(golden_checkpoint):
    other_yaml = GOLDEN_DIR / "tiny_chunk1008" / "config.yml"
    with pytest.raises(ConfigError, match="decoder_dim"):
        losatok_jax.load_losatok(golden_checkpoint("tiny_chunk40"), config_path=other_yaml)


def test_loading_a_checkpoint_of_another_layout_says_what_to_do(golden_model, tmp_path):
    """A checkpoint whose parameter names differ from the model's is refused with a message that
    says why: linear layers stored (in, out) by an earlier version, or which names differ."""
    model = golden_model("tiny_chunk40")
    old_layout = losatok_jax.Losatok(in_out_kernels(model.params), model.config)
    checkpoint.save(tmp_path / "old", old_layout)
    with pytest.raises(checkpoint.CheckpointError, match="earlier losatok-jax.*convert the "
                                                         "upstream .pth files again"):
        losatok_jax.load_losatok(tmp_path / "old")
    params = dict(model.params)
    del params["fc_a"]
    checkpoint.save(tmp_path / "partial", losatok_jax.Losatok(params, model.config))
    with pytest.raises(checkpoint.CheckpointError, match=r"do not match config.json \(missing: "
                                                         r"fc_a/bias, fc_a/weight; unexpected: -"):
        losatok_jax.load_losatok(tmp_path / "partial")
