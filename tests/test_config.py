"""The one config type: read from upstream's YAML or our JSON, checked, and shipped in the package."""

import dataclasses

import pytest

from helpers import GOLDEN_DIR
from losatok_jax.config import (RELEASED_CONFIG, ConfigError, LosatokConfig, from_upstream_yaml,
                                load_config, packaged_config, resolve_config_path)


def test_the_released_config_is_the_default_and_ships_in_the_package():
    assert packaged_config().is_file() and packaged_config().name == RELEASED_CONFIG
    config = load_config(packaged_config())
    assert config == LosatokConfig()
    assert (config.embed_dim, config.decoder_dim, config.semantic.depth) == (1280, 128, 32)
    assert config.samples_per_token == 640 and config.min_samples == 513


def test_a_packaged_config_is_found_by_its_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(f"config/{RELEASED_CONFIG}") == packaged_config()
    (tmp_path / "config").mkdir()
    mine = tmp_path / "config" / RELEASED_CONFIG
    mine.write_text(packaged_config().read_text().replace("decoder_depth\": 12",
                                                          "decoder_depth\": 6"))
    assert resolve_config_path(f"config/{RELEASED_CONFIG}") == mine.relative_to(tmp_path)
    assert load_config(f"config/{RELEASED_CONFIG}").decoder_depth == 6  # a user's file wins
    assert resolve_config_path("nowhere.yml").name == "nowhere.yml"  # not ours: left as given
    with pytest.raises(ConfigError, match="cannot read config nowhere.yml"):
        load_config("nowhere.yml")


def test_json_round_trip_and_golden_yaml():
    config = load_config(GOLDEN_DIR / "tiny_chunk40" / "config.yml")
    assert (config.embed_dim, config.semantic.depth, config.semantic.chunk_tokens) == (64, 2, 10)
    assert LosatokConfig.from_json(config.to_json()) == config
    assert config.replace(decoder_depth=3).decoder_depth == 3
    assert hash(config) == hash(LosatokConfig.from_json(config.to_json()))  # frozen, hashable


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace('"hop_length": 160,', '"hop_length": 160, "bogus": 1,'),
     "unknown AudioVAE.config_dict keys"),
    (lambda text: text.replace('"istft_hop": 320,', ''), "lacks"),
    (lambda text: text.replace('"istft_hop": 320', '"istft_hop": 300'), "multiple of istft_hop"),
    (lambda text: "just a string\n", "no 'AudioVAE.config_dict' mapping"),
    (lambda text: text + "\n  : : [\n", "not valid YAML"),
])
def test_bad_yaml_is_a_config_error(tmp_path, edit, message):
    path = tmp_path / "bad.yml"
    path.write_text(edit(packaged_config().read_text()))
    with pytest.raises(ConfigError, match=message):
        from_upstream_yaml(path)


def test_unknown_json_keys_are_refused(tmp_path):
    data = dataclasses.asdict(LosatokConfig())
    data["semantic"]["colour"] = "blue"
    with pytest.raises(ConfigError, match="unknown keys"):
        LosatokConfig.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.json")
