"""Batch plans (host-side): buckets, encode windows, decode windows with halos, packed decode rows
and batch groups. What running the plans gives is in test_execution.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import losatok_jax
from losatok_jax import Buckets, _batching
from losatok_jax._batching import (decode_pieces, decoder_gap, decoder_halo, encode_pieces,
                                   pack_decode_rows)
from losatok_jax.config import LosatokConfig

# Encode rows: 4 tokens or one 10-token chunk; decode rows: 4, 16 or 64 tokens.
SMALL = Buckets(batch_sizes=(1, 2, 4), num_tokens=(4, 16, 64))


def test_buckets_are_validated(model):
    with pytest.raises(ValueError, match="increasing"):
        Buckets(batch_sizes=(4, 2))
    with pytest.raises(ValueError, match="decoder halo"):
        losatok_jax.api.decode(model, [np.zeros((30, 16), np.float32)],
                           buckets=Buckets(num_tokens=(10,)))


def test_encode_lengths_stop_at_the_chunk(model):
    assert model.config.semantic.chunk_tokens == 10
    assert SMALL.encode_lengths(model.config) == (4, 10)
    assert Buckets(num_tokens=(32, 256)).encode_lengths(model.config) == (10,)
    assert [(p.start, p.count) for p in encode_pieces(model.config, 0, 23)] == [
        (0, 10), (10, 10), (20, 3)]


@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 121, 122, 123, 500])
def test_decode_windows_cover_once_with_whole_halos(model, tokens):
    halo = decoder_halo(model.config)
    pieces = decode_pieces(model.config, SMALL, 0, tokens)
    assert [p.start for p in pieces] == [0] + [p.start + p.count for p in pieces[:-1]]
    assert pieces[-1].start + pieces[-1].count == tokens
    for p in pieces:
        assert p.stop - p.source <= SMALL.max_tokens
        assert p.source == max(0, p.start - halo)
        assert p.stop == min(tokens, p.start + p.count + halo)
    assert len({p.stop - p.source for p in pieces[:-1]}) <= 1  # one length but for the last


def test_decode_windows_take_the_length_that_computes_least(model):
    buckets = Buckets()
    assert decoder_halo(model.config) == 7

    def plan(tokens):
        return [buckets.length(p.stop - p.source) for p in decode_pieces(model.config, buckets, 0,
                                                                          tokens)]

    assert plan(800) == [800]
    assert plan(810) == [504, 320]  # 824 tokens, not one window of 1008
    assert plan(1100) == [800, 320]  # 1120 tokens, not one window of 1260
    assert plan(1500) == [1512]  # one window: 1512 tokens, against 640 + 640 + 252
    assert plan(2003) == [1008, 1008, 16]  # 2032 tokens; filling 1512 first would take 1512 + 640


@settings(max_examples=50, deadline=None)
@given(needs=st.lists(st.integers(1, 1512), min_size=1, max_size=40))
def test_packed_rows_keep_windows_apart_and_never_compute_more(needs):
    config, buckets = LosatokConfig(), Buckets()
    gap = decoder_gap(config)
    pieces = [_batching.Piece(i, 0, n, 0, n) for i, n in enumerate(needs)]
    rows = pack_decode_rows(config, buckets, pieces)
    assert sorted(p.clip for row in rows for p, _ in row.pieces) == list(range(len(needs)))
    for row in rows:
        end = -gap
        for p, offset in sorted(row.pieces, key=lambda member: member[1]):
            assert offset >= end + gap
            end = offset + p.stop - p.source
        assert end <= row.length and row.length == buckets.length(end)
    assert sum(row.length for row in rows) <= sum(buckets.length(n) for n in needs)


def test_packing_cuts_the_padding_of_a_mixed_batch():
    """The benchmark's 8 mixed clips (1-12 s): 1212 tokens computed for 1171, not 1316."""
    config, buckets = LosatokConfig(), Buckets()
    seconds = np.random.default_rng(1234).uniform(1, 12, 8)  # as benchmarks.workloads draws it
    tokens = [config.num_tokens(int(round(s * 16000))) for s in seconds]
    pieces = [p for i, t in enumerate(tokens) for p in decode_pieces(config, buckets, i, t)]
    assert sum(tokens) == 1171
    assert sum(buckets.length(p.stop - p.source) for p in pieces) == 1316
    assert sum(row.length for row in pack_decode_rows(config, buckets, pieces)) == 1212


def test_batch_groups_put_filler_only_in_the_last_group():
    buckets = Buckets(batch_sizes=(1, 2, 4, 8), num_tokens=(16, 64), max_batch_tokens=256)
    sizes = [size for _, size in buckets.batch_groups(list(range(7)), 16)]
    assert sizes == [4, 2, 1]  # 7 rows as 4 + 2 + 1, not 8 with one row of filler
    assert [size for _, size in buckets.batch_groups(list(range(12)), 64)] == [4, 4, 4]  # budget
    groups = list(buckets.batch_groups(list(range(5)), 16, num_devices=2))
    assert [(len(g), size) for g, size in groups] == [(4, 4), (1, 2)]  # one row per device min
    odd = Buckets(batch_sizes=(4,), num_tokens=(16,))
    assert [(len(g), size) for g, size in odd.batch_groups(list(range(6)), 16)] == [(4, 4), (2, 4)]


def test_a_batch_plan_sets_each_length_its_batch(model, tmp_path):
    """A plan's batches replace the token budget for its lengths; extraction's buckets are the
    powers of two up to the largest planned batch, and the plan must match model and dtype."""
    path = tmp_path / "plan.json"
    _batching.write_batch_plan(str(path), {4: 64, 10: 16}, config=model.config,
                               dtype="float32", target="v5e:2x4", hbm_fraction=0.9)
    plan = _batching.read_batch_plan(str(path), "float32")
    buckets = _batching.batch_plan_buckets(plan, str(path), model.config)
    assert buckets.num_tokens == (4, 10) and buckets.batch_sizes == (1, 2, 4, 8, 16, 32, 64)
    assert (buckets.max_batch(4), buckets.max_batch(10)) == (64, 16)
    assert buckets.encode_lengths(model.config) == (4, 10)
    assert [size for _, size in buckets.batch_groups(list(range(100)), 4)] == [64, 32, 4]
    assert _batching.extraction_buckets(8, (4, 10)).batch_sizes == (1, 2, 4, 8)
    assert _batching.extraction_buckets(12).batch_sizes == (1, 2, 4, 8, 12)

    with pytest.raises(_batching.BatchPlanError, match="for --compute_dtype float32, not bf"):
        _batching.read_batch_plan(str(path), "bfloat16")
    other = dataclasses.replace(model.config, decoder_depth=model.config.decoder_depth + 1)
    with pytest.raises(_batching.BatchPlanError, match="another model config"):
        _batching.batch_plan_buckets(plan, str(path), other)
    for text in ("not json", '{"format": "losatok-batch-plan"}', json.dumps(
            {**plan, "encode_batches": {"4": 0}}), json.dumps({**plan, "format": "other"})):
        path.write_text(text)
        with pytest.raises(_batching.BatchPlanError, match="not a batch plan"):
            _batching.read_batch_plan(str(path), "float32")
    with pytest.raises(_batching.BatchPlanError, match="cannot read it"):
        _batching.read_batch_plan(str(tmp_path / "missing.json"), "float32")


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 3000), start=st.integers(0, 40), window=st.sampled_from([1, 4, 10]))
def test_a_window_buffer_is_the_reflect_padded_clip(model, length, start, window):
    """Every sample of a window: the clip's own inside it, mirrored without the edge sample
    outside it, held at the first sample where the mirror runs out (clips shorter than the
    padding)."""
    config = model.config
    clip = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    start = min(start, config.num_tokens(length) - 1) if length >= config.min_samples else start
    begin = start * config.samples_per_token - config.front_end_pad
    index = np.abs(np.arange(begin, begin + _batching.window_samples(config, window)))
    index = np.where(index > length - 1, 2 * (length - 1) - index, index)
    expected = clip[np.clip(index, 0, length - 1)]
    np.testing.assert_array_equal(_batching.window_buffer(config, clip, start, window), expected)
    out = np.full(len(expected), np.nan, np.float32)
    _batching.window_buffer(config, clip, start, window, out=out)
    np.testing.assert_array_equal(out, expected)
