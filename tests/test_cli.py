"""The command-line tool `python -m losatok_jax.reconstruct` and the audio I/O beneath it.

The CLI runs in-process through `main(argv)` on the tiny golden checkpoint (fast: JAX compiles
once per shape and the runs share shapes); one subprocess run proves the module entry point and
that bad input ends with status 2 and a single `error:` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import librosa
import numpy as np
import pytest
import soundfile as sf

from losatok_jax.audio_io import AudioReadError, AudioWriteError, load_audio, save_audio
from losatok_jax.model import FEATURE_KEYS, reconstruct

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEECH = REPO_ROOT / "examples" / "speech.wav"
TINY_CONFIG = REPO_ROOT / "tests" / "data" / "golden" / "tiny_chunk40" / "config.yml"
SENTINEL = b"an earlier output that a failed run must leave alone"


@pytest.fixture(scope="module")
def cli():
    from losatok_jax.reconstruct import main

    return main


def run_cli(main, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one in-process CLI run."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def speech_run(cli, checkpoint, tmp_path_factory):
    """One CLI run on examples/speech.wav, saving features: (status, stdout, stderr, out dir)."""
    out_dir = tmp_path_factory.mktemp("speech")
    result = run_cli(cli, "--input_path", SPEECH, "--output_path", out_dir / "recon.wav",
                     "--model_path", checkpoint, "--save_features", out_dir / "features.npz")
    return (*result, out_dir)


@pytest.fixture(scope="module")
def expected(model):
    """What the Python API gives for examples/speech.wav: (audio (640·T,), features)."""
    audio, features = reconstruct(model, load_audio(SPEECH))
    return np.asarray(audio[0]), features


def test_reconstructs_speech(speech_run, model, expected):
    status, stdout, stderr, out_dir = speech_run
    assert status == 0 and stderr == ""
    info = sf.info(out_dir / "recon.wav")
    assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "WAV", "FLOAT")
    audio, _ = sf.read(out_dir / "recon.wav", dtype="float32")
    num_tokens = model.config.num_tokens(sf.info(SPEECH).frames)
    assert audio.shape == (model.config.samples_per_token * num_tokens,)
    assert np.abs(audio).max() <= 1.0
    np.testing.assert_allclose(audio, np.clip(expected[0], -1, 1), rtol=0, atol=1e-5)

    dims = {key: expected[1][key].shape[-1] for key in FEATURE_KEYS}
    assert stdout.splitlines() == [f"{key}: (1, {num_tokens}, {dims[key]})"
                                   for key in FEATURE_KEYS] + [f"wrote {out_dir / 'recon.wav'}"]


def test_save_features(speech_run, expected):
    status, _, _, out_dir = speech_run
    assert status == 0
    with np.load(out_dir / "features.npz") as saved:
        assert sorted(saved.files) == sorted(FEATURE_KEYS)
        for key in FEATURE_KEYS:
            assert saved[key].shape == expected[1][key].shape
            assert saved[key].shape[0] == 1 and saved[key].ndim == 3
            np.testing.assert_allclose(saved[key], expected[1][key], rtol=0, atol=1e-5)


def test_sample_is_seeded(cli, checkpoint, speech_run, tmp_path):
    def sampled(seed: int) -> np.ndarray:
        out = tmp_path / f"seed{seed}.wav"
        status, _, stderr = run_cli(cli, "--input_path", SPEECH, "--output_path", out,
                                    "--model_path", checkpoint, "--sample", "--seed", seed)
        assert status == 0, stderr
        return sf.read(out, dtype="float32")[0]

    first, again, other = sampled(1), sampled(1), sampled(2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other, atol=1e-4)
    mean_only = sf.read(speech_run[3] / "recon.wav", dtype="float32")[0]
    assert not np.allclose(first, mean_only, atol=1e-4)


def test_dtype_bfloat16_reconstructs_close_to_float32(cli, checkpoint, speech_run, tmp_path):
    out = tmp_path / "bf16.wav"
    status, _, stderr = run_cli(cli, "--input_path", SPEECH, "--output_path", out,
                                "--model_path", checkpoint, "--dtype", "bfloat16")
    assert status == 0, stderr
    bf16 = sf.read(out, dtype="float32")[0]
    f32 = sf.read(speech_run[3] / "recon.wav", dtype="float32")[0]
    assert bf16.shape == f32.shape and not np.array_equal(bf16, f32)
    assert np.linalg.norm(bf16 - f32) <= 0.02 * np.linalg.norm(f32)  # 0.7% measured


def test_max_duration_truncates(cli, checkpoint, model, tmp_path):
    out = tmp_path / "short.wav"
    status, stdout, stderr = run_cli(cli, "--input_path", SPEECH, "--output_path", out,
                                     "--model_path", checkpoint, "--max_duration", "1.5")
    assert status == 0, stderr
    num_tokens = model.config.num_tokens(24000)
    assert stdout.splitlines()[0] == f"z: (1, {num_tokens}, {model.config.decoder_dim})"
    assert sf.info(out).frames == model.config.samples_per_token * num_tokens
    np.testing.assert_array_equal(load_audio(SPEECH, max_duration=1.5), load_audio(SPEECH)[:24000])


def test_config_path_is_found_from_any_directory(cli, checkpoint, tmp_path, monkeypatch):
    """A repo-relative --config_path (as upstream's default is) works outside the repository."""
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run_cli(cli, "--input_path", SPEECH, "--output_path", "out.wav",
                                "--model_path", checkpoint,
                                "--config_path", TINY_CONFIG.relative_to(REPO_ROOT))
    assert status == 0 and stderr == ""
    assert sf.info(tmp_path / "out.wav").samplerate == 16000


def test_load_audio_downmixes_and_resamples(tmp_path):
    speech = load_audio(SPEECH)
    left = librosa.resample(speech, orig_sr=16000, target_sr=44100)
    stereo = np.stack([left, 0.5 * left[::-1]], axis=1)
    sf.write(tmp_path / "stereo.flac", stereo, 44100, subtype="PCM_24")
    stored, _ = sf.read(tmp_path / "stereo.flac", dtype="float32")  # after FLAC's quantisation

    loaded = load_audio(tmp_path / "stereo.flac")
    assert loaded.dtype == np.float32 and loaded.shape == (math.ceil(len(left) * 16000 / 44100),)
    expected = librosa.resample(stored.mean(axis=1), orig_sr=44100, target_sr=16000,
                                res_type="soxr_hq")
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("container, subtype, rate", [("OGG", "VORBIS", 48000),
                                                      ("MP3", "MPEG_LAYER_III", 22050)])
def test_load_audio_reads_compressed_formats(tmp_path, container, subtype, rate):
    if container not in sf.available_formats() or subtype not in sf.available_subtypes(container):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {subtype}")
    speech = load_audio(SPEECH)
    path = tmp_path / f"speech.{container.lower()}"
    sf.write(path, librosa.resample(speech, orig_sr=16000, target_sr=rate), rate,
             format=container, subtype=subtype)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    assert abs(len(loaded) - len(speech)) <= 16  # codecs may pad by a few samples
    n = min(len(loaded), len(speech))
    assert np.corrcoef(loaded[:n], speech[:n])[0, 1] > 0.99  # lossy, but the same speech


def test_load_audio_rejects_non_finite_samples(tmp_path):
    audio = np.zeros(1000, np.float32)
    audio[10] = np.nan
    sf.write(tmp_path / "nan.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(AudioReadError, match="NaN or Inf"):
        load_audio(tmp_path / "nan.wav")


def test_load_audio_accepts_streamed_wav_headers(tmp_path):
    """A WAV written to a pipe carries a placeholder length (espeak-ng's here); not truncation."""
    data = bytearray(SPEECH.read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = (0x7FFFF000).to_bytes(4, "little")
    (tmp_path / "streamed.wav").write_bytes(data)
    np.testing.assert_array_equal(load_audio(tmp_path / "streamed.wav"), load_audio(SPEECH))


def test_save_audio_clips_and_leaves_no_partial_file(tmp_path):
    save_audio(tmp_path / "out.wav", np.array([0.5, 2.0, -3.0], np.float32))
    np.testing.assert_array_equal(sf.read(tmp_path / "out.wav", dtype="float32")[0],
                                  [0.5, 1.0, -1.0])
    (tmp_path / "keep.wav").write_bytes(SENTINEL)
    with pytest.raises(ValueError):
        save_audio(tmp_path / "keep.wav", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(AudioWriteError, match="(?i)is a directory"):
        save_audio(tmp_path, np.zeros(10, np.float32))
    assert (tmp_path / "keep.wav").read_bytes() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav", "out.wav"]


def _unavailable_platform() -> str | None:
    for platform in ("tpu", "gpu"):
        try:
            jax.devices(platform)
        except RuntimeError:
            return platform
    return None


def _write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _write_wav(path: Path, num_samples: int) -> Path:
    sf.write(path, np.zeros(num_samples, np.float32), 16000)
    return path


# Each case writes its inputs into a tmp dir and returns the CLI arguments that make it fail.
# They come after "--output_path DIR/out.wav --model_path CHECKPOINT"; argparse lets the last
# occurrence of a flag win, so a case may replace either.
ERROR_CASES = {
    "missing input": lambda d: ["--input_path", d / "missing.wav"],
    "random bytes": lambda d: [
        "--input_path", _write_file(d / "noise.wav", np.random.default_rng(0).bytes(4000))],
    "truncated wav": lambda d: [
        "--input_path", _write_file(d / "half.wav", SPEECH.read_bytes()[:55_000])],
    "truncated wav header": lambda d: [
        "--input_path", _write_file(d / "header.wav", SPEECH.read_bytes()[:30])],
    "too short": lambda d: ["--input_path", _write_wav(d / "short.wav", 100)],
    "output directory missing": lambda d: [
        "--input_path", SPEECH, "--output_path", d / "missing" / "out.wav"],
    "model_path not a checkpoint": lambda d: [
        "--input_path", SPEECH, "--model_path", TINY_CONFIG.parent / "losatok.pth"],
    "unavailable device": lambda d: ["--input_path", SPEECH, "--device", _unavailable_platform()],
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_error_line(cli, checkpoint, tmp_path, case):
    if case == "unavailable device" and _unavailable_platform() is None:
        pytest.skip("every --device choice is available here")
    existing = tmp_path / "out.wav"
    existing.write_bytes(SENTINEL)
    args = ["--output_path", existing, "--model_path", checkpoint, *ERROR_CASES[case](tmp_path)]
    before = sorted(tmp_path.iterdir())
    status, stdout, stderr = run_cli(cli, *args)
    assert status == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ")
    assert "Traceback" not in stderr and stdout == ""
    assert existing.read_bytes() == SENTINEL  # not destroyed, not replaced
    assert sorted(tmp_path.iterdir()) == before  # and no temporary file left behind


def test_entry_point_fails_cleanly(tmp_path):
    """`python -m` from another directory: damaged input gives status 2 and one error line."""
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "losatok_jax.reconstruct", "--input_path", "noise.wav",
         "--output_path", "out.wav"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: noise.wav is not a readable audio file (Format not recognised.)"]
    assert not (tmp_path / "out.wav").exists()


def test_package_reconstruct_stays_callable(cli, model):
    """Importing the CLI module rebinds `losatok_jax.reconstruct`; calls still reach the API."""
    import losatok_jax

    audio = load_audio(SPEECH)[:16000]
    via_package, _ = losatok_jax.reconstruct(model, audio)
    direct, _ = reconstruct(model, audio)
    np.testing.assert_array_equal(via_package, direct)


def test_second_run_compiles_nothing(checkpoint, tmp_path):
    """With the persistent cache (here through its environment variable), a second process
    loads every program from disk."""
    env = {**os.environ, "LOSATOK_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    lines = []
    for run in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "losatok_jax.reconstruct", "--input_path", str(SPEECH),
             "--output_path", str(tmp_path / f"run{run}.wav"), "--model_path", str(checkpoint)],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        lines.append(result.stdout.splitlines()[-1])
    assert lines[0].endswith(" compiled") and not lines[0].endswith(" 0 compiled")
    assert lines[1].endswith(" 0 compiled"), lines[1]
    np.testing.assert_array_equal(sf.read(tmp_path / "run0.wav")[0], sf.read(tmp_path / "run1.wav")[0])


def test_ten_minute_file_streams_exactly(cli, checkpoint, model, tmp_path):
    """Ten minutes through the CLI (windowed) equals the whole-sequence model in one piece."""
    rng = np.random.default_rng(10)
    minutes = 10
    audio = (0.05 * rng.standard_normal(16000 * 60 * minutes)).astype(np.float32)
    audio *= (0.6 + 0.4 * np.sin(np.arange(audio.size) / 16000)).astype(np.float32)
    sf.write(tmp_path / "long.wav", audio, 16000, subtype="FLOAT")
    status, stdout, stderr = run_cli(cli, "--input_path", tmp_path / "long.wav", "--output_path",
                                     tmp_path / "long_recon.wav", "--model_path", checkpoint)
    assert status == 0, stderr
    streamed = sf.read(tmp_path / "long_recon.wav", dtype="float32")[0]

    whole = jax.jit(lambda m, x: m.apply(m.apply(x, method="encode")["z"], method="decode"))
    expected = np.clip(np.asarray(whole(model, audio[None]))[0], -1, 1)
    assert streamed.shape == expected.shape == (640 * model.config.num_tokens(audio.size),)
    assert np.max(np.abs(streamed - expected)) <= 1e-5
