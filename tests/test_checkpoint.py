"""Converted checkpoints on disk: the stored config, loading with a config, refusing other
layouts, and the streamed (group-at-a-time) save the converter uses."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import losatok_jax
from helpers import GOLDEN_CASES, GOLDEN_DIR, in_out_kernels
from losatok_jax import ConfigError, LosatokConfig, checkpoint, load_config


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


def test_a_checkpoint_saved_in_groups_equals_one_saved_whole(golden_model, tmp_path):
    """`save_in_groups` (one Orbax partial save per group) writes the layout `save` does: `load`
    restores the same parameters, and nothing of the partial saves is left behind."""
    model = golden_model("tiny_chunk40")
    flat = {k: np.asarray(v) for k, v in flatten_dict(model.params).items()}
    keys = sorted(flat)
    groups = [{k: flat[k] for k in keys[i::3]} for i in range(3)]
    checkpoint.save_in_groups(tmp_path / "grouped", model.config, iter(groups))
    assert sorted(p.name for p in (tmp_path / "grouped").iterdir()) == ["config.json", "params"]
    loaded = losatok_jax.load_losatok(tmp_path / "grouped")
    assert loaded.config == model.config
    assert checkpoint.mismatch(tmp_path / "grouped") is None
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoint.CheckpointError, match="already holds a checkpoint"):
        checkpoint.save_in_groups(tmp_path / "grouped", model.config, iter(groups))


def test_a_failed_grouped_save_leaves_no_checkpoint(golden_model, tmp_path):
    model = golden_model("tiny_chunk40")

    def groups():
        yield {("fc_a", "bias"): np.zeros(3, np.float32)}
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        checkpoint.save_in_groups(tmp_path / "broken", model.config, groups())
    assert list((tmp_path / "broken").iterdir()) == []
