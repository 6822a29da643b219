"""Latents for training: records, the data source over both storage formats, normalisation, and
`latent_dataset`'s crop/pad and packed batches (property tests on synthetic extractions)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losatok_jax import _shards, data

WIDTH = 3


def make_extraction(directory, lengths, format="arrayrecord", seed=0):
    """An extraction directory of random latents of `lengths`, written as `extract` writes one."""
    directory.mkdir(parents=True, exist_ok=True)
    _shards.record_settings(directory, {"format": format, "features": ["z"], "dtype": "float32",
                                        "compute_dtype": "float32", "sample": False,
                                        "seed": None})
    writer = _shards.GroupWriter(directory, 0, 4, format, "float32")
    rng = np.random.default_rng(seed)
    latents = {}
    for i, n in enumerate(lengths):
        clip_id = f"clip{i:03d}.wav"
        latents[clip_id] = (rng.standard_normal((n, WIDTH)) * (1 + i % 3) + i % 5).astype(
            np.float32)
        writer.write({"id": clip_id, "path": clip_id, "duration": n / 25, "sample_rate": 16000},
                     {"z": latents[clip_id]})
    writer.close()
    _shards.merge(directory)
    return latents


@pytest.mark.parametrize("tokens", [3, 0])
def test_record_round_trip(tokens):
    features = {"z": np.arange(4 * tokens, dtype=np.float32).reshape(tokens, 4)}
    for dtype in ("float32", "bfloat16", "float16"):
        record = data.decode_record(data.encode_record(id="x", path="p", duration=0.12,
                                                       sample_rate=16000, features=features,
                                                       dtype=dtype))
        assert (record["id"], record["path"], record["num_tokens"]) == ("x", "p", tokens)
        assert record["z"].dtype.name == dtype
        np.testing.assert_array_equal(record["z"].astype(np.float32), features["z"])


@pytest.mark.parametrize("format", _shards.FORMATS)
def test_the_source_reads_both_formats(tmp_path, format):
    latents = make_extraction(tmp_path, [5, 9, 2, 7, 1], format)
    source = data.LatentDataSource(tmp_path)
    assert len(source) == 5
    for i in range(5):
        record = source[i]
        np.testing.assert_array_equal(record["z"], latents[record["id"]])
        assert record["num_tokens"] == len(latents[record["id"]])


def test_normalize_is_inverted_by_denormalize(tmp_path):
    latents = make_extraction(tmp_path, [30, 40, 50])
    everything = np.concatenate(list(latents.values())).astype(np.float64)
    normalized = data.normalize(everything, tmp_path)
    np.testing.assert_allclose(normalized.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(data.denormalize(normalized, tmp_path), everything, atol=1e-4)


def _normalized(latents, directory):
    return {k: data.normalize(v, directory) for k, v in latents.items()}


def _find(row, records):
    """(record id, start) of the record that `row` is a contiguous slice of."""
    for clip_id, z in records.items():
        for start in range(len(z) - len(row) + 1):
            if np.allclose(z[start:start + len(row)], row, atol=1e-6):
                return clip_id, start
    return None


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
       tokens=st.integers(1, 16), batch=st.integers(1, 4), seed=st.integers(0, 3))
def test_crops_are_contiguous_normalised_slices_or_padded_records(tmp_path_factory, lengths,
                                                                   tokens, batch, seed):
    directory = tmp_path_factory.mktemp("crop")
    records = _normalized(make_extraction(directory, lengths, seed=seed), directory)
    dataset = data.latent_dataset(directory, tokens=tokens, batch_size=batch, seed=seed,
                                  num_epochs=2, drop_remainder=False)
    seen = collections.Counter()
    for batch_ in dataset:
        assert batch_["z"].shape[1:] == (tokens, WIDTH) and batch_["z"].dtype == np.float32
        assert batch_["mask"].shape == batch_["z"].shape[:2] and batch_["mask"].dtype == bool
        for z, mask in zip(batch_["z"], batch_["mask"]):
            real = int(mask.sum())
            assert mask[:real].all() and not mask[real:].any()  # real tokens come first
            assert not z[real:].any()  # padding is zeros
            found = _find(z[:real], records)
            assert found is not None
            clip_id, _ = found
            assert real == min(tokens, len(records[clip_id]))
            seen[clip_id] += 1
    assert sum(seen.values()) == 2 * len(lengths)  # one row per record per epoch


def _unpack(batches, tokens):
    """Each row's pieces, as (values, positions) in row order, from segment ids."""
    pieces = []
    for batch in batches:
        assert batch["z"].shape[1:] == (tokens, WIDTH)
        for z, segments, positions in zip(batch["z"], batch["segment_ids"], batch["positions"]):
            assert segments.dtype == positions.dtype == np.int32
            assert not z[segments == 0].any() and not positions[segments == 0].any()
            ids = [s for s in dict.fromkeys(segments) if s]
            assert ids == list(range(1, len(ids) + 1))  # 1, 2, ... in order
            for s in ids:
                where = np.flatnonzero(segments == s)
                assert (np.diff(where) == 1).all()  # a piece is contiguous
                np.testing.assert_array_equal(positions[where], np.arange(len(where)))
                pieces.append(z[where])
    return pieces


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=12),
       tokens=st.integers(2, 24), batch=st.integers(1, 4), epochs=st.integers(1, 2))
def test_packing_places_every_token_exactly_once_per_epoch(tmp_path_factory, lengths, tokens,
                                                          batch, epochs):
    directory = tmp_path_factory.mktemp("pack")
    records = _normalized(make_extraction(directory, lengths), directory)
    dataset = data.latent_dataset(directory, tokens=tokens, batch_size=batch, pack=True,
                                  num_epochs=epochs, drop_remainder=False)
    pieces = _unpack(list(dataset), tokens)
    assert all(len(p) <= tokens for p in pieces)
    got = collections.Counter(tuple(np.round(t, 5)) for p in pieces for t in p)
    want = collections.Counter(tuple(np.round(t, 5)) for z in records.values() for t in z)
    assert got == collections.Counter({k: v * epochs for k, v in want.items()})


def test_each_host_reads_a_disjoint_share(tmp_path):
    import grain

    make_extraction(tmp_path, list(range(1, 12)))
    shares = []
    for index in range(2):
        options = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
        rows = data.latent_dataset(tmp_path, tokens=64, batch_size=1, shard_options=options,
                                   normalize=False, shuffle=False)
        shares.append({int(b["mask"].sum()) for b in rows})
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(1, 12))


def test_epochs_reshuffle_and_the_seed_decides(tmp_path):
    make_extraction(tmp_path, list(range(1, 20)))

    def order(seed):
        dataset = data.latent_dataset(tmp_path, tokens=32, batch_size=1, seed=seed,
                                      num_epochs=2, normalize=False)
        return [int(b["mask"].sum()) for b in dataset]

    first = order(0)
    assert first == order(0) and first != order(1)
    assert first[:19] != first[19:] and sorted(first[:19]) == sorted(first[19:])


def test_bad_arguments(tmp_path):
    make_extraction(tmp_path, [3])
    with pytest.raises(ValueError, match="positive"):
        data.latent_dataset(tmp_path, tokens=0, batch_size=1)
    with pytest.raises(FileNotFoundError):
        data.latent_dataset(tmp_path / "nowhere", tokens=4, batch_size=1)
