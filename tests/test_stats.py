"""Exact per-channel statistics: partial moments merge to the statistics of all values at once."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losatok_jax import stats


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 300), min_size=1, max_size=6), seed=st.integers(0, 9))
def test_merged_moments_equal_numpy_over_all_values(cuts, seed):
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((sum(cuts), 5)) * rng.uniform(0.01, 100, 5)
              + rng.uniform(-1e3, 1e3, 5)).astype(np.float32)
    parts, start = [], 0
    for n in cuts:
        parts.append({"z": stats.Moments.of(values[start:start + n])})
        start += n
    order = rng.permutation(len(parts))  # the order of merging does not matter
    merged = stats.merge_all(parts[i] for i in order)
    if not len(values):
        assert merged["z"].count == 0
        return
    summary = merged["z"].summary()
    reference = values.astype(np.float64)
    assert summary["count"] == len(values)
    np.testing.assert_allclose(summary["mean"], reference.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(summary["std"], reference.std(axis=0), rtol=1e-9, atol=1e-12)


def test_stats_file_round_trip(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(8, 3)
    for i, part in enumerate((values[:3], values[3:])):
        (tmp_path / f"p{i}.json").write_text(stats.part_json({"z": stats.Moments.of(part)}))
    stats.write_stats(tmp_path, [tmp_path / "p0.json", tmp_path / "p1.json"])
    written = json.loads((tmp_path / stats.STATS_FILE).read_text())
    assert written["z"]["count"] == 8
    mean, std = stats.load_stats(tmp_path, "z")
    np.testing.assert_allclose(mean, values.mean(axis=0))
    np.testing.assert_allclose(std, values.std(axis=0), rtol=1e-6)
    with pytest.raises(stats.StatsError, match="no statistics for 'mu'"):
        stats.load_stats(tmp_path, "mu")
    with pytest.raises(stats.StatsError, match="cannot read"):
        stats.load_stats(tmp_path / "nowhere", "z")
