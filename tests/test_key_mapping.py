"""Upstream state-dict keys to the Flax tree: one rule table, repeated layers stacked in order,
shapes known before any tensor is read."""

import numpy as np
import pytest

from losatok_jax import _key_mapping


def test_repeated_layers_are_stacked_in_layer_order():
    key = "semantic_encoder.encoder.blocks.{}.mlp.fc1.weight"
    state = {key.format(i): np.full((3, 2), i, np.float32) for i in (2, 0, 1)}
    [(path, leaf)] = _key_mapping.plan(state).items()
    assert path == "semantic_encoder/encoder/blocks/mlp/fc1/weight"
    assert leaf.sources == tuple(key.format(i) for i in range(3)) and leaf.stacked
    assert leaf.shape((3, 2)) == (3, 3, 2)
    stacked = leaf.build(state.__getitem__)
    np.testing.assert_array_equal(stacked[:, 0, 0], [0, 1, 2])


def test_convolutions_are_relaid_out_and_buffers_dropped():
    conv = "dasheng_tokenizer.decoder.backbone.embed.weight"  # (out, in, k) -> (k, in, out)
    state = {conv: np.arange(24, dtype=np.float32).reshape(4, 3, 2),
             "dasheng_tokenizer.decoder.head.istft.window": np.ones(8, np.float32),
             "semantic_encoder.encoder.init_bn.num_batches_tracked": np.zeros((), np.int64)}
    flat = _key_mapping.to_flax(state)
    assert list(flat) == ["dasheng_tokenizer/decoder/backbone/embed/kernel"]
    np.testing.assert_array_equal(flat["dasheng_tokenizer/decoder/backbone/embed/kernel"],
                                  state[conv].transpose(2, 1, 0))
    leaf = _key_mapping.plan(state)["dasheng_tokenizer/decoder/backbone/embed/kernel"]
    assert leaf.shape((4, 3, 2)) == (2, 3, 4)


def test_gaps_and_unknown_keys_are_named():
    key = "dasheng_tokenizer.decoder.backbone.convnext.{}.gamma"
    with pytest.raises(_key_mapping.MappingError, match=r"layers \[1\] are missing"):
        _key_mapping.plan([key.format(0), key.format(2)])
    with pytest.raises(_key_mapping.MappingError, match="no rule maps key 'weird'"):
        _key_mapping.plan(["weird"])
