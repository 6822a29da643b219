"""An extraction directory on disk: groups committed by their index, what a killed run leaves
cleaned up, the settings guard, and the merged index and statistics."""

import json

import numpy as np
import pytest

from losatok_jax import _shards, data, stats

SETTINGS = {"format": "arrayrecord", "features": ["z"], "dtype": "float32",
            "compute_dtype": "float32", "sample": False, "seed": None}


def _clips(count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        info = {"id": f"dir/c{i}.wav", "path": f"/data/dir/c{i}.wav", "duration": 1.0,
                "sample_rate": 16000}
        yield info, {"z": (rng.standard_normal((3 + 5 * i, 4)) * 3 + i).astype(np.float32)}


@pytest.mark.parametrize("format", _shards.FORMATS)
def test_groups_are_committed_by_their_index_and_merged(tmp_path, format):
    dtype = "float16" if format == "npy" else "bfloat16"  # .npy has no bfloat16
    writer = _shards.GroupWriter(tmp_path, process=0, shard_size=2, format=format, dtype=dtype)
    clips = list(_clips(5))
    for info, features in clips:
        writer.write(info, features)
    assert len(list(tmp_path.glob("*.index.jsonl"))) == 2  # the third group is still open
    writer.close()
    _shards.merge(tmp_path)
    rows = data.read_index(tmp_path)
    assert [row["id"] for row in rows] == [info["id"] for info, _ in clips]
    assert _shards.completed_ids(tmp_path) == {info["id"] for info, _ in clips}
    stored = np.concatenate([f["z"].astype(data.STORAGE_DTYPES[dtype]).astype(np.float64)
                             for _, f in clips])
    written = json.loads((tmp_path / stats.STATS_FILE).read_text())["z"]
    assert written["count"] == len(stored)  # the statistics of the values as stored
    np.testing.assert_allclose(written["mean"], stored.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(written["std"], stored.std(axis=0), rtol=1e-9)
    if format == "npy":
        for row, (info, features) in zip(rows, clips):
            assert row["file"] == info["id"] + ".npy"
            saved = np.load(tmp_path / row["file"])
            assert saved.dtype == np.float16 and saved.shape == features["z"].shape
            sidecar = json.loads((tmp_path / (info["id"] + ".json")).read_text())
            assert sidecar["path"] == info["path"] and sidecar["num_tokens"] == len(saved)


def test_records_are_stored_uncompressed(tmp_path):
    """Latents barely compress, and compressing them costs the host more than writing them."""
    writer = _shards.GroupWriter(tmp_path, 0, 32, "arrayrecord", "float32")
    rng = np.random.default_rng(0)
    payload = 0
    for info, _ in _clips(32):
        z = rng.standard_normal((250, 128)).astype(np.float32)
        writer.write(info, {"z": z})
        payload += z.nbytes
    [shard] = tmp_path.glob("*.array_record")
    # Compressed (ArrayRecord's default), these floats took 0.94 of their bytes.
    assert shard.stat().st_size >= payload


def test_a_group_without_its_index_is_redone(tmp_path):
    writer = _shards.GroupWriter(tmp_path, 0, 2, "arrayrecord", "float32")
    clips = list(_clips(4))
    for info, features in clips[:2]:
        writer.write(info, features)
    for info, features in clips[2:]:
        writer.write(info, features)
    (tmp_path / "latents-00000-00001.index.jsonl").unlink()  # killed before the commit
    (tmp_path / "latents-00000-00002.array_record.tmp").write_bytes(b"half a shard")
    _shards.clean_up(tmp_path, process=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latents-00000-00000.array_record", "latents-00000-00000.index.jsonl",
        "latents-00000-00000.stats.json"]
    assert _shards.completed_ids(tmp_path) == {clips[0][0]["id"], clips[1][0]["id"]}
    redo = _shards.GroupWriter(tmp_path, 0, 2, "arrayrecord", "float32")
    for info, features in clips[2:]:
        redo.write(info, features)
    _shards.merge(tmp_path)
    assert json.loads((tmp_path / stats.STATS_FILE).read_text())["z"]["count"] == sum(
        len(f["z"]) for _, f in clips)


def test_a_process_drops_only_its_own_per_clip_temporaries(tmp_path):
    """A kill while a `.npy` or its `.json` was being written leaves a hidden temporary beside
    it; the next run of that process drops it, never one another process is writing."""
    writer = _shards.GroupWriter(tmp_path, 0, 2, "npy", "float32")
    [(info, features)] = list(_clips(1))
    writer.write({**info, "id": "deep/clip.wav"}, features)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    (tmp_path / "deep" / ".clip.wav.json.latents-00000.0badc0de.tmp").write_text("{")
    (tmp_path / "deep" / ".other.wav.npy.latents-00001.0badc0de.tmp").write_bytes(b"")
    _shards.clean_up(tmp_path, process=0)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(
        written + ["deep/.other.wav.npy.latents-00001.0badc0de.tmp"])


def test_npy_names_stay_inside_the_output_directory():
    assert _shards.npy_name("nested/b.flac") == "nested/b.flac.npy"
    assert _shards.npy_name("/abs/x.wav") == "abs/x.wav.npy"
    assert _shards.npy_name("../up/./y.wav") == "_parent_/up/y.wav.npy"


def test_settings_guard_names_the_earlier_flags(tmp_path):
    _shards.check_settings(tmp_path, SETTINGS)  # nothing recorded yet: reads only
    assert not (tmp_path / _shards.SETTINGS_FILE).exists()
    _shards.record_settings(tmp_path, SETTINGS)
    _shards.check_settings(tmp_path, dict(SETTINGS))  # a resume with the same settings goes on
    with pytest.raises(_shards.ExtractError, match="extracted with no --sample; re-run"):
        _shards.check_settings(tmp_path, {**SETTINGS, "sample": True, "seed": 3})
    with pytest.raises(_shards.ExtractError, match="--format arrayrecord"):
        _shards.check_settings(tmp_path, {**SETTINGS, "format": "npy"})
    assert json.loads((tmp_path / _shards.SETTINGS_FILE).read_text()) == SETTINGS
    older = tmp_path / "older"
    older.mkdir()
    (older / _shards.SETTINGS_FILE).write_text(json.dumps({k: v for k, v in SETTINGS.items()
                                                           if k != "format"}))
    with pytest.raises(_shards.ExtractError, match="earlier losatok-jax, without statistics"):
        _shards.check_settings(older, SETTINGS)
