"""Reading any audio file into the model's input format, and writing outputs safely."""

from __future__ import annotations

import math
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

from losatok_jax.audio_io import AudioReadError, AudioWriteError, load_audio, save_audio

SPEECH = Path(__file__).resolve().parent.parent / "examples" / "speech.wav"
SENTINEL = b"an earlier output that a failed run must leave alone"


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
