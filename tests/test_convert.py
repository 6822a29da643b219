"""The converter: what it refuses (exit status 2, the offending key or field named, nothing
written) and which checkpoint forms it accepts (bare or wrapped state dicts, bf16 and fp16, a
MiDashengLM safetensors folder as semantic-encoder source).

Checkpoints are variations of the golden tiny_chunk40 one, whose sizes are TINY_SIZES.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import losatok_jax
import torch_oracle
from helpers import GOLDEN_DIR, TINY_SIZES, run_converter, write_upstream_config

CASE_DIR = GOLDEN_DIR / "tiny_chunk40"
FB_KEY = torch_oracle.ACOUSTIC_FB_KEY


@pytest.fixture
def golden_state():
    """A fresh, modifiable copy of tiny_chunk40's bare state dict."""
    return torch_oracle.load_state_dict(CASE_DIR / "losatok.pth")


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _convert(tmp_path, model_path, config_path=CASE_DIR / "config.yml", semantic=None):
    """Runs the converter into a new tmp_path/out; returns (status, output dir)."""
    output_dir = tmp_path / "out"
    return run_converter(config_path, model_path, output_dir, semantic), output_dir


def _assert_same_params(a: losatok_jax.Losatok, b: losatok_jax.Losatok):
    assert a.config == b.config
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def _assert_refused(status, output_dir, capsys, *fragments):
    err = capsys.readouterr().err
    assert status == 2, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in converter message:\n{err}"
    assert not output_dir.exists(), "a refused conversion must write nothing"


def _drop_fc_a_bias(state):
    del state["fc_a.bias"]


def _add_foo(state):
    state["foo.weight"] = torch.zeros(3, 3)


def _reshape_fc_a(state):
    state["fc_a.weight"] = torch.zeros(TINY_SIZES["decoder_dim"], TINY_SIZES["embed_dim"] + 1)


def _perturb_filterbank(state):
    state[FB_KEY] = state[FB_KEY] * 1.01


@pytest.mark.parametrize("modify, fragments", [
    (_drop_fc_a_bias, ["missing key fc_a.bias"]),
    (_add_foo, ["unexpected key foo.weight"]),
    (_reshape_fc_a, ["shape mismatch at fc_a.weight", "(16, 65)", "(16, 64)"]),
    (_perturb_filterbank, [f"buffer {FB_KEY} differs"]),
], ids=["missing-key", "extra-key", "wrong-shape", "wrong-buffer"])
def test_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys, golden_state, modify,
                                                fragments):
    modify(golden_state)
    status, output_dir = _convert(tmp_path, _save(golden_state, tmp_path / "m.pth"))
    _assert_refused(status, output_dir, capsys, *fragments)


@pytest.mark.parametrize("overrides, fragment", [
    ({"depth": 3}, "semantic_encoder_config.depth: checkpoint has 2, config says 3"),
    ({"embed_dim": 32, "decoder_embed_dim": 32}, "embed_dim: checkpoint has 64, config says 32"),
    ({"qkv_bias": False}, "semantic_encoder_config.qkv_bias: checkpoint has True"),
    ({"init_values": 0.1}, "semantic_encoder_config.layer_scale: checkpoint has False"),
], ids=["depth", "embed_dim", "qkv_bias", "layer_scale"])
def test_refuses_a_config_that_disagrees_with_the_checkpoint(tmp_path, capsys, overrides,
                                                             fragment):
    config = write_upstream_config(tmp_path / "config.yml", **{**TINY_SIZES, **overrides})
    status, output_dir = _convert(tmp_path, CASE_DIR / "losatok.pth", config)
    _assert_refused(status, output_dir, capsys, fragment)


def test_refuses_a_truncated_file(tmp_path, capsys):
    data = (CASE_DIR / "losatok.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    status, output_dir = _convert(tmp_path, truncated)
    _assert_refused(status, output_dir, capsys, str(truncated), "not a readable PyTorch checkpoint")


def test_refuses_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    status, output_dir = _convert(tmp_path, missing)
    _assert_refused(status, output_dir, capsys, str(missing), "no such file")


def test_refuses_a_non_empty_output_dir_and_leaves_it_alone(tmp_path, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    status, _ = _convert(tmp_path, CASE_DIR / "losatok.pth")
    err = capsys.readouterr().err
    assert status == 2
    assert str(output_dir) in err and "not empty" in err
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]
    assert (output_dir / "notes.txt").read_text() == "keep me"


def test_converts_into_an_existing_empty_dir(tmp_path, golden_model):
    (tmp_path / "out").mkdir()
    status, output_dir = _convert(tmp_path, CASE_DIR / "losatok.pth")
    assert status == 0
    _assert_same_params(losatok_jax.load_losatok(output_dir), golden_model("tiny_chunk40"))


@pytest.mark.parametrize("case, wrap", [("tiny_chunk40", True), ("tiny_chunk1008", False)],
                         ids=["bare-to-wrapped", "wrapped-to-bare"])
def test_bare_and_wrapped_state_dicts_convert_alike(tmp_path, golden_model, case, wrap):
    """Each golden file has one form; re-saving it in the other must not change the result."""
    state = torch_oracle.load_state_dict(GOLDEN_DIR / case / "losatok.pth")
    model_path = _save({"state_dict": state} if wrap else state, tmp_path / "m.pth")
    status, output_dir = _convert(tmp_path, model_path, GOLDEN_DIR / case / "config.yml")
    assert status == 0
    _assert_same_params(losatok_jax.load_losatok(output_dir), golden_model(case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_checkpoint_converts_to_its_float32_cast(tmp_path, golden_state, dtype):
    """A `model.to(dtype)` state dict, buffers included (they are rounded too)."""
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in golden_state.items()}
    as_float32 = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    status, half_dir = _convert(tmp_path / "half", _save(half, tmp_path / "half.pth"))
    assert status == 0
    status, float32_dir = _convert(tmp_path / "f32", _save(as_float32, tmp_path / "f32.pth"))
    assert status == 0
    half_model = losatok_jax.load_losatok(half_dir)
    _assert_same_params(half_model, losatok_jax.load_losatok(float32_dir))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(half_model.params))


def _midashenglm_folder(path: Path, scale_norm: float = 1.0) -> Path:
    """MiDashengLM-style HF folder: `audio_encoder.*` split over two shards, beside unrelated
    `language_model.*` tensors and a front-end buffer that the converter must ignore."""
    semantic = torch_oracle.load_state_dict(CASE_DIR / "semantic_encoder.pth")
    encoder = {"audio_encoder." + k[len("encoder."):]: v.clone()
               for k, v in semantic.items() if k.startswith("encoder.")}
    encoder["audio_encoder.norm.weight"] *= scale_norm
    encoder["audio_encoder.front_end.0.mel_scale.fb"] = torch.full((257, 64), float("nan"))
    keys = sorted(encoder)
    shards = [{k: encoder[k] for k in keys[0::2]}, {k: encoder[k] for k in keys[1::2]}]
    shards[0]["language_model.model.embed_tokens.weight"] = torch.randn(10, 8)
    shards[1]["language_model.lm_head.weight"] = torch.randn(10, 8)
    path.mkdir()
    for i, shard in enumerate(shards, 1):
        save_file(shard, str(path / f"model-0000{i}-of-00002.safetensors"))
    return path


def test_midashenglm_folder_as_semantic_source(tmp_path, golden_model):
    folder = _midashenglm_folder(tmp_path / "midashenglm")
    status, output_dir = _convert(tmp_path, CASE_DIR / "losatok.pth", semantic=folder)
    assert status == 0
    _assert_same_params(losatok_jax.load_losatok(output_dir), golden_model("tiny_chunk40"))


def _semantic_encoder_pth(path: Path, scale_norm: float) -> Path:
    """Upstream's semantic_encoder.pth layout, `{"state_dict": {encoder.*, bottleneck.*}}`."""
    semantic = torch_oracle.load_state_dict(CASE_DIR / "semantic_encoder.pth")
    semantic["encoder.norm.weight"] = semantic["encoder.norm.weight"] * scale_norm
    return _save({"state_dict": semantic}, path)


@pytest.mark.parametrize("make_source", [_semantic_encoder_pth, _midashenglm_folder],
                         ids=["semantic_encoder.pth", "midashenglm-folder"])
def test_semantic_source_replaces_the_checkpoints_tensors(tmp_path, golden_model, make_source):
    """Guards the equality tests: the source's tensors are used, not silently skipped."""
    source = make_source(tmp_path / "semantic_source", scale_norm=2.0)
    status, output_dir = _convert(tmp_path, CASE_DIR / "losatok.pth", semantic=source)
    assert status == 0
    ours = losatok_jax.load_losatok(output_dir).params["semantic_encoder"]["encoder"]["norm"]
    plain = golden_model("tiny_chunk40").params["semantic_encoder"]["encoder"]["norm"]
    np.testing.assert_array_equal(ours["scale"], 2.0 * np.asarray(plain["scale"]))
    np.testing.assert_array_equal(ours["bias"], plain["bias"])
