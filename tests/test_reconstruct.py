"""The command-line tool `python -m losatok_jax.reconstruct`, upstream's command line included.

The CLI runs in-process through `main(argv)` on the tiny golden checkpoint (fast: JAX compiles
once per shape and the runs share shapes); one subprocess run proves the module entry point and
that bad input ends with status 2 and a single `error:` line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from losatok_jax.audio_io import load_audio
from losatok_jax.api import reconstruct
from losatok_jax.model import FEATURE_KEYS

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


def test_upstream_command_line_as_written(cli, speech_run, expected, tmp_path):
    """Upstream's own flags: a .pth --model_path is converted once into `<name>.orbax/` beside
    it, and --save_features with a .pt name writes torch tensors."""
    torch = pytest.importorskip("torch")
    pth = _copy(TINY_CONFIG.parent / "losatok.pth", tmp_path)
    args = ("--config_path", TINY_CONFIG, "--model_path", pth, "--input_path", SPEECH,
            "--output_path", tmp_path / "recon.wav", "--save_features", tmp_path / "en.pt")
    status, stdout, stderr = run_cli(cli, *args)
    assert status == 0 and stderr == "", stderr
    assert stdout.splitlines()[0] == (f"converted {pth} into {tmp_path / 'losatok.orbax'}; "
                                        "later runs reuse it")
    np.testing.assert_array_equal(sf.read(tmp_path / "recon.wav")[0],
                                  sf.read(speech_run[3] / "recon.wav")[0])
    saved = torch.load(tmp_path / "en.pt")
    assert sorted(saved) == sorted(FEATURE_KEYS)
    for key in FEATURE_KEYS:
        np.testing.assert_allclose(saved[key].numpy(), expected[1][key], rtol=0, atol=1e-5)
    status, stdout, stderr = run_cli(cli, *args)  # the second run reuses the conversion
    assert status == 0 and stderr == "" and "converted" not in stdout

    (tmp_path / "losatok.pth").write_bytes(pth.read_bytes() + b"\0")  # another file, same name
    status, _, stderr = run_cli(cli, *args)
    assert status == 2 and "was converted from another version" in stderr


def test_upstream_formats_need_no_torch(cli, speech_run, tmp_path, monkeypatch):
    """The runtime package reads and writes torch's format itself: with torch unimportable the
    .pth converts and the .pt features are written, and torch reads them afterwards."""
    torch = pytest.importorskip("torch")
    pth = _copy(TINY_CONFIG.parent / "losatok.pth", tmp_path)
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "torch", None)  # `import torch` fails as if not installed
        status, _, stderr = run_cli(cli, "--config_path", TINY_CONFIG, "--model_path", pth,
                                    "--input_path", SPEECH, "--output_path", tmp_path / "r.wav",
                                    "--save_features", tmp_path / "f.pt")
    assert status == 0, stderr
    np.testing.assert_array_equal(sf.read(tmp_path / "r.wav")[0],
                                  sf.read(speech_run[3] / "recon.wav")[0])
    with np.load(speech_run[3] / "features.npz") as saved:
        features = torch.load(tmp_path / "f.pt")
        assert sorted(features) == sorted(saved.files)
        for key in saved.files:
            np.testing.assert_array_equal(features[key].numpy(), saved[key])


def test_device_cuda_means_the_gpu(cli, tmp_path):
    """Upstream's default `--device cuda`: the GPU where there is one, else one clear error."""
    from losatok_jax import reconstruct as cli_module

    assert cli_module.PLATFORMS["cuda"] == cli_module.PLATFORMS["gpu"] == "gpu"
    try:
        jax.devices("gpu")
        pytest.skip("a GPU is present: the CPU-only error path cannot be shown here")
    except RuntimeError:
        pass
    status, _, stderr = run_cli(cli, "--input_path", SPEECH, "--output_path", tmp_path / "r.wav",
                                "--device", "cuda")
    assert status == 2 and stderr.startswith("error: --device cuda: cannot run on a GPU: ")
    assert "pip install 'losatok-jax[gpu]'" in stderr and len(stderr.splitlines()) == 1
    assert "rocm" not in stderr


def test_released_config_ships_with_the_package(cli, tmp_path, monkeypatch):
    """Upstream's `--config_path config/16k_16k_25Hz_losatok.yml` works from any folder: the
    released config is package data."""
    from losatok_jax.config import RELEASED_CONFIG, LosatokConfig, load_config, packaged_config

    monkeypatch.chdir(tmp_path)
    assert load_config(f"config/{RELEASED_CONFIG}") == load_config(packaged_config())
    assert load_config(f"config/{RELEASED_CONFIG}") == LosatokConfig()


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


def _copy(path: Path, folder: Path) -> Path:
    (folder / path.name).write_bytes(path.read_bytes())
    return folder / path.name


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
    "truncated wav header": lambda d: [
        "--input_path", _write_file(d / "header.wav", SPEECH.read_bytes()[:30])],
    "too short": lambda d: ["--input_path", _write_wav(d / "short.wav", 100)],
    "output directory missing": lambda d: [
        "--input_path", SPEECH, "--output_path", d / "missing" / "out.wav"],
    "model_path not a checkpoint": lambda d: [
        "--input_path", SPEECH, "--model_path", TINY_CONFIG.parent],
    "pth that does not fit the config": lambda d: [
        "--input_path", SPEECH, "--model_path", _copy(TINY_CONFIG.parent / "losatok.pth", d)],
    "features in an unknown format": lambda d: [
        "--input_path", SPEECH, "--save_features", d / "features.h5"],
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


def test_a_truncated_file_is_reconstructed_with_one_warning(cli, checkpoint, tmp_path):
    """An interrupted copy: the header promises more than the file holds. What is there is
    reconstructed, and one warning line says how much is missing."""
    half = _write_file(tmp_path / "half.wav", SPEECH.read_bytes()[:55_000])
    status, stdout, stderr = run_cli(cli, "--input_path", half, "--output_path",
                                     tmp_path / "out.wav", "--model_path", checkpoint)
    assert status == 0
    [line] = stderr.splitlines()
    assert line.startswith(f"warning: {half} is truncated: its header promises ")
    held = (55_000 - 44) // 2
    assert sf.info(tmp_path / "out.wav").frames == 640 * ((1 + held // 160) // 4)


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
        "error: noise.wav is not a readable audio file (Invalid data found when processing "
        "input; libsndfile: Format not recognised.)"]
    assert not (tmp_path / "out.wav").exists()


def test_importing_the_cli_leaves_the_api_alone(cli):
    """`losatok_jax.reconstruct` is the CLI module; the API function stays in `losatok_jax.api`."""
    import types

    import losatok_jax
    import losatok_jax.api

    assert isinstance(losatok_jax.reconstruct, types.ModuleType)
    assert type(losatok_jax.reconstruct) is types.ModuleType  # no class swapped in
    assert losatok_jax.api.reconstruct is reconstruct and callable(reconstruct)


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
    # Past a minute, progress shows: in a log (here), the first line, then one every 10 s.
    assert stderr.splitlines()[0].startswith("encoding 10.0 min of audio: 1/")
    assert all(re.fullmatch(r"(en|de)coding 10\.0 min of audio: \d+/\d+ batches, \d+ s", line)
               for line in stderr.splitlines())
    streamed = sf.read(tmp_path / "long_recon.wav", dtype="float32")[0]

    whole = jax.jit(lambda m, x: m.apply(m.apply(x, method="encode")["z"], method="decode"))
    expected = np.clip(np.asarray(whole(model, audio[None]))[0], -1, 1)
    assert streamed.shape == expected.shape == (640 * model.config.num_tokens(audio.size),)
    assert np.max(np.abs(streamed - expected)) <= 1e-5
