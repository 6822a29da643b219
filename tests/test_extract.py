"""Pod-scale extraction: data parallelism, `python -m losatok_jax.extract`, and reading records back.

Multi-device and multi-process behaviour runs in subprocesses: 8 simulated CPU devices need
XLA_FLAGS before JAX starts, and jax.distributed needs processes of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import losatok_jax
import media
from losatok_jax import _batching, data
from losatok_jax.audio_io import load_audio, read_audio

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    """A child environment that imports this checkout and sees only the XLA flags it is given."""
    inherited = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**inherited, "PYTHONPATH": str(REPO_ROOT), **extra}


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    """Varied lengths, sample rates and channel counts in wav/flac/ogg/mp3, AAC in M4A, Opus in
    WebM (an upper-case suffix), WMA, a video with sound and a WAV cut short, a nested folder; one
    corrupt file, one empty file, one too short to encode, one with a NaN sample and a video
    without sound."""
    root = tmp_path_factory.mktemp("audio")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)

    def noise(seconds, rate, channels=1):
        shape = (int(seconds * rate), channels) if channels > 1 else (int(seconds * rate),)
        return 0.1 * rng.standard_normal(shape)

    sf.write(root / "a.wav", noise(3.0, 16000), 16000)
    sf.write(root / "nested" / "b.flac", noise(2.2, 44100, channels=2), 44100)
    sf.write(root / "c.ogg", noise(5.5, 48000), 48000, format="OGG", subtype="VORBIS")
    sf.write(root / "d.mp3", noise(4.0, 22050), 22050, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(root / "e.wav", noise(7.3, 8000), 8000)
    sf.write(root / "nested" / "f.wav", noise(0.6, 16000), 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    (root / "empty.flac").write_bytes(b"")
    sf.write(root / "short.wav", noise(0.01, 16000), 16000)
    not_finite = noise(2.0, 16000)
    not_finite[20000] = np.nan
    sf.write(root / "nan.wav", not_finite, 16000, subtype="FLOAT")
    media.encode(root / "g.m4a", "aac", seconds=2.0)
    media.encode(root / "nested" / "h.WEBM", "libopus", rate=48000, seconds=2.5)
    media.encode(root / "i.wma", "wmav2", container="asf", seconds=1.5)
    media.encode(root / "movie.mp4", "aac", seconds=2.0, video=True)
    whole = media.sndfile(root / "cut.wav", seconds=3.0, channels=1, rate=16000).read_bytes()
    (root / "cut.wav").write_bytes(whole[:len(whole) // 2])
    media.video_only(root / "silent_film.mp4")
    return root


GOOD = ("a.wav", "c.ogg", "cut.wav", "d.mp3", "e.wav", "g.m4a", "i.wma", "movie.mp4",
        "nested/b.flac", "nested/f.wav", "nested/h.WEBM")
BAD = ("corrupt.wav", "empty.flac", "nan.wav", "short.wav", "silent_film.mp4")


def run_extract(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "losatok_jax.extract", *map(str, args)],
                            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def assert_stats_are_the_records(directory: Path, records: dict[str, dict]) -> None:
    """stats.json equals NumPy float64 statistics over every stored token of every record."""
    written = json.loads((directory / "stats.json").read_text())
    for feature, summary in written.items():
        values = np.concatenate([np.asarray(r[feature], np.float64) for r in records.values()])
        assert summary["count"] == len(values)
        np.testing.assert_allclose(summary["mean"], values.mean(axis=0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(summary["std"], values.std(axis=0), rtol=1e-6)


def read_records(directory: Path) -> dict[str, dict]:
    source = data.LatentDataSource(directory)
    records = [source[i] for i in range(len(source))]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a clip was written twice"
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def extracted(checkpoint, audio_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    result = run_extract("--model_path", checkpoint, "--input", audio_folder, "--output_dir", out,
                         "--features", "z,mu,semantic_emb", "--shard_size", "2",
                         "--batch_size", "2", "--buckets", "32,64", "--num_workers", "3")
    assert "done: 11 clips extracted, 0 skipped as already stored, 5 failed" in result.stdout
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "cut.wav is truncated" in warning
    # In a log, progress is a line every 10 s at most (the first batch, in a run this short).
    assert len([line for line in result.stderr.splitlines() if " clips, " in line]) == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock file
    return out


def test_records_equal_per_file_encode(extracted, audio_folder, model):
    records = read_records(extracted)
    assert sorted(records) == sorted(GOOD)
    for clip_id, record in records.items():
        audio = read_audio(audio_folder / clip_id).samples
        [expected] = losatok_jax.encode(model, [audio], features=("z", "mu", "semantic_emb"))
        assert record["path"] == str(audio_folder / clip_id)
        assert record["num_tokens"] == len(expected["z"]) == model.config.num_tokens(len(audio))
        assert record["duration"] == pytest.approx(len(audio) / 16000)
        assert record["sample_rate"] == 16000
        for key in ("z", "mu", "semantic_emb"):
            assert record[key].dtype == np.float32
            np.testing.assert_allclose(record[key], expected[key], rtol=0, atol=1e-5)


def test_stats_are_exact_over_the_records(extracted):
    records = read_records(extracted)
    assert set(json.loads((extracted / "stats.json").read_text())) == {"z", "mu", "semantic_emb"}
    assert_stats_are_the_records(extracted, records)


def test_index_and_failures(extracted):
    index = [json.loads(line) for line in (extracted / "index.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in index) == sorted(GOOD)
    for row in index:  # each index row points at its record
        shard = data.decode_record(_read_shard(extracted / row["shard"])[row["position"]])
        assert shard["id"] == row["id"]
    failures = [json.loads(line) for line in (extracted / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == sorted(BAD)
    assert all(f["reason"] for f in failures)
    assert "too short" in next(f["reason"] for f in failures if f["id"] == "short.wav")
    assert "NaN or Inf" in next(f["reason"] for f in failures if f["id"] == "nan.wav")
    assert "no audio stream" in next(f["reason"] for f in failures
                                     if f["id"] == "silent_film.mp4")
    truncated = {row["id"]: row.get("truncated_seconds") for row in index}
    assert truncated.pop("cut.wav") == pytest.approx(1.5, abs=0.01)
    assert set(truncated.values()) == {None}


def _read_shard(path: Path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.read_all()
    finally:
        reader.close()


def test_rerun_skips_completed_clips(extracted, checkpoint, audio_folder):
    before = sorted(p.name for p in extracted.glob("*.array_record"))
    result = run_extract("--model_path", checkpoint, "--input", audio_folder, "--output_dir",
                         extracted, "--features", "z,mu,semantic_emb", "--shard_size", "2",
                         "--buckets", "32,64")
    assert "done: 0 clips extracted, 11 skipped as already stored, 5 failed" in result.stdout
    assert sorted(p.name for p in extracted.glob("*.array_record")) == before


def test_a_failed_write_stops_the_run_with_earlier_groups_committed(checkpoint, audio_folder,
                                                                    tmp_path, monkeypatch):
    """Records are written on their own thread, a group behind the encoding: a write that fails
    there stops the run in the main thread, and every group before it is complete."""
    from losatok_jax import _shards, extract

    write, calls = _shards.GroupWriter.write, []

    def failing_write(self, info, features):
        calls.append(info["id"])
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        write(self, info, features)

    monkeypatch.setattr(_shards.GroupWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        extract.main(["--model_path", str(checkpoint), "--input", str(audio_folder),
                      "--output_dir", str(out), "--shard_size", "2", "--batch_size", "1",
                      "--buckets", "64", "--num_workers", "1"])
    # Groups of 4 clips (batch 1 x 4): the first group's two shards are committed.
    assert len(calls) == 6
    assert len(list(out.glob("latents-*.index.jsonl"))) == 2
    assert len(read_records(out)) == 4


def test_compute_dtype_and_a_rerun_with_other_settings(checkpoint, audio_folder, tmp_path,
                                                      model):
    """bfloat16 compute gives latents near float32's; the folder records it, and a re-run into
    it with other settings stops before touching anything."""
    out, manifest = tmp_path / "bf16", tmp_path / "one.txt"
    manifest.write_text(f"{audio_folder / 'a.wav'}\n")
    run_extract("--model_path", checkpoint, "--input", manifest, "--output_dir", out,
                "--compute_dtype", "bfloat16", "--buckets", "32,64")
    z = read_records(out)[str(audio_folder / "a.wav")]["z"]
    [expected] = losatok_jax.encode(model, [load_audio(audio_folder / "a.wav")], features=("z",))
    assert z.dtype == np.float32 and not np.array_equal(z, expected["z"])
    np.testing.assert_allclose(z, expected["z"], rtol=0, atol=0.05)
    assert json.loads((out / "extraction.json").read_text())["compute_dtype"] == "bfloat16"
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    result = run_extract("--model_path", checkpoint, "--input", manifest, "--output_dir", out,
                         "--features", "z,mu", "--buckets", "32,64", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--features z --compute_dtype bfloat16" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_storage_dtype_and_manifest(checkpoint, audio_folder, tmp_path, model):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(audio_folder / name), "id": f"clip-{i}"})
                                + "\n" for i, name in enumerate(GOOD[:2])))
    run_extract("--model_path", checkpoint, "--input", manifest, "--output_dir", tmp_path / "out",
                "--dtype", "bfloat16", "--buckets", "32,64")
    records = read_records(tmp_path / "out")
    assert sorted(records) == ["clip-0", "clip-1"]
    [expected] = losatok_jax.encode(model, [load_audio(audio_folder / GOOD[0])], features=("z",))
    assert records["clip-0"]["z"].dtype.name == "bfloat16"
    np.testing.assert_allclose(records["clip-0"]["z"].astype(np.float32), expected["z"],
                               rtol=1e-2, atol=1e-2)
    assert_stats_are_the_records(tmp_path / "out", records)  # of the bfloat16 values as stored


def test_a_batch_plan_sets_the_buckets_and_batches(checkpoint, audio_folder, tmp_path, model):
    """`--batch_plan` (as `plan --batch_plan` writes it) runs its lengths at its batches; the
    latents are the same as at any other batching."""
    manifest = tmp_path / "clips.txt"
    manifest.write_text("".join(f"{audio_folder / name}\n" for name in GOOD[:4]))
    plan = tmp_path / "batch_plan.json"
    _batching.write_batch_plan(str(plan), {4: 16, 10: 4}, config=model.config, dtype="float32",
                               target="v5e:2x4", hbm_fraction=0.9)
    run_extract("--model_path", checkpoint, "--input", manifest, "--output_dir", tmp_path / "out",
                "--batch_plan", plan)
    records = read_records(tmp_path / "out")
    assert len(records) == 4
    for name in GOOD[:4]:
        [expected] = losatok_jax.encode(model, [read_audio(audio_folder / name).samples],
                                        features=("z",))
        np.testing.assert_allclose(records[str(audio_folder / name)]["z"], expected["z"],
                                   rtol=0, atol=1e-5)


def test_strict_and_bad_arguments(checkpoint, audio_folder, tmp_path):
    result = run_extract("--model_path", checkpoint, "--input", audio_folder, "--output_dir",
                         tmp_path / "strict", "--strict", "--buckets", "32,64", check=False)
    assert result.returncode == 2 and "--strict" in result.stderr
    assert "Traceback" not in result.stderr
    cut_only = tmp_path / "cut.txt"
    cut_only.write_text(f"{audio_folder / 'cut.wav'}\n")
    result = run_extract("--model_path", checkpoint, "--input", cut_only, "--output_dir",
                         tmp_path / "strict_cut", "--strict", "--buckets", "32,64", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: {audio_folder / 'cut.wav'} is "
                                                     "truncated")
    for args, message in (((tmp_path / "missing",), "no such file"),
                          ((audio_folder / "a.wav",), "expected a folder"),
                          ((audio_folder, "--process_id", "1"), "go together"),
                          ((audio_folder, "--num_processes", "2", "--process_id", "2"),
                           "--process_id 2 is not in 0..1")):
        result = run_extract("--model_path", checkpoint, "--input", *args, "--output_dir",
                             tmp_path / "x", check=False)
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.parametrize("format", ["arrayrecord", "npy"])
def test_kill_and_resume_is_exactly_once(checkpoint, tmp_path, model, format):
    """SIGKILL after the first complete group, then a re-run: every clip exactly once, and the
    statistics are those of the records present."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(40):
        sf.write(folder / f"clip{i:02d}.wav", 0.1 * rng.standard_normal(int(16000 * rng.uniform(0.5, 2))),
                 16000)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "losatok_jax.extract", "--model_path", str(checkpoint),
            "--input", str(folder), "--output_dir", str(out), "--shard_size", "2",
            "--batch_size", "1", "--buckets", "64", "--num_workers", "1", "--format", format]
    process = subprocess.Popen(args, env=_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(out.glob("latents-*.index.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    complete_before = len(list(out.glob("latents-*.index.jsonl")))
    assert 1 <= complete_before < 20, "the kill should land mid-run"

    result = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_records(out)
    assert sorted(records) == [f"clip{i:02d}.wav" for i in range(40)]
    assert not list(out.glob("*.tmp"))
    sample = records["clip05.wav"]
    [expected] = losatok_jax.encode(model, [load_audio(folder / "clip05.wav")], features=("z",))
    np.testing.assert_allclose(sample["z"], expected["z"], rtol=0, atol=1e-5)
    assert_stats_are_the_records(out, records)
    if format == "npy":
        assert sorted(p.name for p in out.glob("clip*.npy")) == sorted(f"{i}.npy" for i in records)
        assert json.loads((out / "clip05.wav.json").read_text())["num_tokens"] == len(sample["z"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sampled_by_one_process(checkpoint, audio_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "single"
    run_extract("--model_path", checkpoint, "--input", audio_folder, "--output_dir", out,
                "--sample", "--seed", "4", "--buckets", "32,64")
    return out


@pytest.mark.parametrize("coordinated", [True, False])
def test_two_processes_equal_one(checkpoint, audio_folder, tmp_path, coordinated,
                                 sampled_by_one_process):
    """Two processes, under jax.distributed (loopback coordinator) or independent (as several
    on one host, each over some of its chips), write the same records as one, sampling
    included (noise is keyed by clip id, not by position or process)."""
    coordinator = ["--coordinator_address", f"127.0.0.1:{_free_port()}"] if coordinated else []
    out = tmp_path / "two"
    processes = [subprocess.Popen(
        [sys.executable, "-m", "losatok_jax.extract", "--model_path", str(checkpoint), "--input",
         str(audio_folder), "--output_dir", str(out), "--sample", "--seed", "4", "--buckets",
         "32,64", *coordinator, "--num_processes", "2", "--process_id", str(i)], env=_env(),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-2000:]
    assert {p.name for p in out.glob("latents-*.array_record")} >= {
        "latents-00000-00000.array_record", "latents-00001-00000.array_record"}
    one, two = read_records(sampled_by_one_process), read_records(out)
    assert sorted(one) == sorted(two) == sorted(GOOD)
    for clip_id in GOOD:
        np.testing.assert_allclose(two[clip_id]["z"], one[clip_id]["z"], rtol=0, atol=1e-5)
    index = (out / "index.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in index) == sorted(GOOD)
    assert_stats_are_the_records(out, two)
