"""`python -m losatok_jax.latents_to_wav`: latents in every form a trainer holds them, back to WAVs equal to
the Python `decode`; bad input is one error line and leaves nothing behind."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import losatok_jax
from losatok_jax import _shards, data
from losatok_jax.latents_to_wav import main

REPO_ROOT = Path(__file__).resolve().parent.parent


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def latents(model):
    rng = np.random.default_rng(5)
    return [(0.5 * rng.standard_normal((n, model.config.decoder_dim))).astype(np.float32)
            for n in (30, 7, 61)]


def expected_audio(model, z):
    return np.clip(losatok_jax.api.decode(model, [z])[0], -1, 1)


def wav(path):
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and sf.info(path).subtype == "FLOAT"
    return audio


def test_npy_npz_and_folders(checkpoint, model, latents, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "deep").mkdir(parents=True)
    np.save(inputs / "one.npy", latents[0])
    np.save(inputs / "deep" / "batch.npy", np.stack([latents[0][:7], latents[1]]))
    np.savez(inputs / "gen.npz", z=latents[2], other=np.zeros(3))
    status, stdout, stderr = run("--model_path", checkpoint, "--input", inputs,
                                 "--output_dir", tmp_path / "out")
    assert status == 0 and stderr == "", stderr
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.wav")) \
        == ["deep/batch-0.wav", "deep/batch-1.wav", "gen.wav", "one.wav"]
    np.testing.assert_allclose(wav(tmp_path / "out" / "one.wav"),
                               expected_audio(model, latents[0]), atol=1e-6)
    np.testing.assert_allclose(wav(tmp_path / "out" / "deep" / "batch-1.wav"),
                               expected_audio(model, latents[1]), atol=1e-6)
    np.testing.assert_allclose(wav(tmp_path / "out" / "gen.wav"),
                               expected_audio(model, latents[2]), atol=1e-6)
    status, _, _ = run("--model_path", checkpoint, "--input", inputs / "one.npy",
                       "--output_dir", tmp_path / "single")
    assert status == 0 and [p.name for p in (tmp_path / "single").iterdir()] == ["one.wav"]


def test_extraction_records_and_normalized_latents(checkpoint, model, latents, tmp_path):
    extraction = tmp_path / "extraction"
    extraction.mkdir()
    _shards.record_settings(extraction, {"format": "arrayrecord", "features": ["z"],
                                         "dtype": "float32", "compute_dtype": "float32",
                                         "sample": False, "seed": None})
    writer = _shards.GroupWriter(extraction, 0, 2, "arrayrecord", "float32")
    for i, z in enumerate(latents):
        writer.write({"id": f"set/clip{i}.flac", "path": "x", "duration": 1.0,
                      "sample_rate": 16000}, {"z": z})
    writer.close()
    _shards.merge(extraction)
    status, _, stderr = run("--model_path", checkpoint, "--input", extraction,
                            "--output_dir", tmp_path / "all")
    assert status == 0, stderr
    assert sorted(p.name for p in (tmp_path / "all" / "set").iterdir()) == [
        "clip0.flac.wav", "clip1.flac.wav", "clip2.flac.wav"]
    status, _, _ = run("--model_path", checkpoint, "--input", extraction, "--ids",
                       "set/clip1.flac", "--output_dir", tmp_path / "some")
    assert status == 0 and [p.name for p in (tmp_path / "some" / "set").iterdir()] == [
        "clip1.flac.wav"]
    np.testing.assert_allclose(wav(tmp_path / "some" / "set" / "clip1.flac.wav"),
                               expected_audio(model, latents[1]), atol=1e-6)
    # A generator's output in the normalised space, de-normalised with the extraction's stats.
    np.save(tmp_path / "generated.npy", data.normalize(latents[2], extraction))
    status, _, stderr = run("--model_path", checkpoint, "--input", tmp_path / "generated.npy",
                            "--normalized", extraction, "--output_dir", tmp_path / "gen")
    assert status == 0, stderr
    np.testing.assert_allclose(wav(tmp_path / "gen" / "generated.wav"),
                               expected_audio(model, latents[2]), atol=1e-5)


BAD_INPUTS = {
    "missing file": (lambda d, w: d / "nothing.npy", "no such file"),
    "wrong width": (lambda d, w: _save(d / "narrow.npy", np.zeros((5, w - 1), np.float32)),
                    "must be shaped (T, 16)"),
    "NaN": (lambda d, w: _save(d / "nan.npy", np.full((5, w), np.nan, np.float32)),
            "NaN or Inf"),
    "wrong rank": (lambda d, w: _save(d / "flat.npy", np.zeros(w, np.float32)),
                   "(T, D) or (B, T, D)"),
    "npz without z": (lambda d, w: _savez(d / "mu.npz", mu=np.zeros((5, w), np.float32)),
                      "needs a `z` array"),
    "unknown record id": (lambda d, w: None, "has no record 'nope'"),
}


def _save(path, array):
    np.save(path, array)
    return path


def _savez(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_writes_nothing(checkpoint, model, latents, tmp_path,
                                                        case):
    make, message = BAD_INPUTS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "good.npy", latents[1])  # a good file beside the bad one is not written
    args = ["--input", make(folder, model.config.decoder_dim) or folder]
    if case == "unknown record id":
        extraction = tmp_path / "extraction"
        extraction.mkdir()
        (extraction / data.INDEX_FILE).write_text(json.dumps({"id": "a", "file": "a.npy"}) + "\n")
        (extraction / data.SETTINGS_FILE).write_text(json.dumps({"format": "npy",
                                                                  "features": ["z"]}))
        args = ["--input", extraction, "--ids", "nope"]
    if case != "missing file":
        args[1] = folder if case != "unknown record id" else args[1]
    status, stdout, stderr = run("--model_path", checkpoint, *args,
                                 "--output_dir", tmp_path / "out")
    assert status == 2 and stdout == ""
    [line] = stderr.splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_entry_point(checkpoint, latents, tmp_path):
    np.save(tmp_path / "z.npy", latents[1])
    result = subprocess.run([sys.executable, "-m", "losatok_jax.latents_to_wav", "--model_path",
                             str(checkpoint), "--input", "z.npy", "--output_dir", "wavs"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                                 "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "wavs" / "z.wav").is_file()
