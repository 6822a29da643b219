"""Reading any audio file into the model's input format as upstream's reader does, and writing
outputs safely.

Upstream reads with `librosa.load(path, sr=16000, mono=True)`: libsndfile where it reads the
file, else FFmpeg (the command line, through audioread). The format tests write every file with
`tests/media.py` and compare with that reader, which needs the ffmpeg command line (`.ci/run`
installs it). Run with `-s` to see the table.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

import media
from losatok_jax._files import OutputError
from losatok_jax.audio_io import (AudioReadError, TruncatedAudioWarning, load_audio, read_audio,
                                  save_audio)

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
    with pytest.raises(OutputError, match="(?i)is a directory"):
        save_audio(tmp_path, np.zeros(10, np.float32))
    assert (tmp_path / "keep.wav").read_bytes() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav", "out.wav"]


# Tolerances against upstream's reader: max |Δ|, correlation, length (1 ms).
MAX_DIFFERENCE, MIN_CORRELATION, LENGTH_SAMPLES = 1e-2, 0.9999, 16
needs_ffmpeg = pytest.mark.skipif(
    not media.HAS_FFMPEG_CLI, reason="needs the ffmpeg command line, which upstream's reader "
    "decodes through and which writes the users' files: apt-get install ffmpeg (or brew install "
    "ffmpeg), then run again")


def upstream_reader(path) -> np.ndarray:
    """librosa.load as upstream calls it (libsndfile, else FFmpeg through audioread)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns when it falls back to audioread
        return librosa.load(path, sr=16000, mono=True)[0]


def compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, float, float]:
    n = min(len(ours), len(theirs))
    return (len(ours) - len(theirs), float(np.abs(ours[:n] - theirs[:n]).max()),
            float(np.corrcoef(ours[:n], theirs[:n])[0, 1]))


@pytest.fixture(scope="module")
def format_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    return {label: media.write_format(folder, label) for label in media.FORMATS}  # None: no CLI


@pytest.fixture(scope="module")
def format_table():
    rows = {}
    yield rows
    print("\n| format | file | length difference (samples) | max abs difference | correlation |")
    print("|---|---|---|---|---|")
    for label, (name, length, difference, correlation) in rows.items():
        print(f"| {label} | {name} | {length:+d} | {difference:.1e} | {correlation:.7f} |")


@needs_ffmpeg
@pytest.mark.parametrize("label", [f for f in media.FORMATS if f != "Opus in Ogg"])
def test_every_format_decodes_as_upstreams_reader(format_files, format_table, label):
    path = format_files[label]
    ours = read_audio(path)
    assert ours.missing_seconds == 0.0 and ours.samples.dtype == np.float32
    length, difference, correlation = compare(ours.samples, upstream_reader(path))
    format_table[label] = (path.name, length, difference, correlation)
    assert abs(length) <= LENGTH_SAMPLES and difference <= MAX_DIFFERENCE
    assert correlation >= MIN_CORRELATION


def test_ogg_opus_keeps_its_pre_skip_out(format_files, format_table):
    """libsndfile reads Ogg Opus right in one call (`sf.read`) but leaves the stream's pre-skip
    (312 samples at 48 kHz here) in when read in blocks, as `librosa.load` reads it; FFmpeg, which
    we read Opus with, drops it as the Opus format says. So ours is libsndfile's one-call read,
    and upstream's reader is the same audio 104 samples (6.5 ms) late."""
    path = format_files["Opus in Ogg"]
    ours = read_audio(path).samples
    whole, rate = sf.read(path, dtype="float32")
    one_call = librosa.resample(whole.mean(axis=1), orig_sr=rate, target_sr=16000,
                                res_type="soxr_hq")
    length, difference, correlation = compare(ours, one_call)
    format_table["Opus in Ogg (vs one-call libsndfile)"] = (path.name, length, difference,
                                                            correlation)
    assert length == 0 and difference <= 1e-5
    late = upstream_reader(path)[104:]
    length, difference, correlation = compare(ours[:len(late)], late)
    format_table["Opus in Ogg (vs librosa, 104 samples later)"] = (path.name, length,
                                                                  difference, correlation)
    assert correlation >= MIN_CORRELATION and difference <= 2e-2


def test_a_frame_count_estimate_is_not_truncation(format_files):
    """A VBR MP3 without a Xing header that starts quietly: libsndfile estimates its length from
    the first frames' bit rate, far above what it holds. Decoding goes to the end of the stream
    and says nothing."""
    path = format_files["MP3, VBR, no Xing header"]
    assert sf.info(path).frames > 2 * 3 * 44100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audio = load_audio(path)
    # Without a Xing/LAME header the encoder's delay and padding stay in: at most 2 frames.
    assert 0 <= len(audio) - 3 * 16000 <= 2 * 1152 * 16000 // 44100


@pytest.mark.parametrize("label", ["PCM 16-bit WAV", "FLAC"])
def test_a_file_cut_short_is_decoded_with_one_warning(format_files, tmp_path, label):
    whole = read_audio(format_files[label]).samples
    cut = tmp_path / format_files[label].name
    cut.write_bytes(format_files[label].read_bytes()[:len(format_files[label].read_bytes()) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audio = load_audio(cut)
    [warning] = caught
    assert warning.category is TruncatedAudioWarning and str(cut) in str(warning.message)
    missing = read_audio(cut).missing_seconds
    assert abs(missing + len(audio) / 16000 - 3.0) < 0.05 and 1.0 < missing < 2.0
    assert f"{missing:.3f} s more audio" in str(warning.message)
    n = len(audio) - 200  # the resampler's edge at the cut
    np.testing.assert_allclose(audio[:n], whole[:n], atol=1e-4)


def test_undecodable_files_are_one_line_errors(format_files, tmp_path):
    flac = bytearray(format_files["FLAC"].read_bytes())
    third = len(flac) // 3
    flac[third:2 * third] = np.random.default_rng(0).integers(0, 256, third, np.uint8).tobytes()
    cases = {
        "damaged.flac": ("is damaged", lambda p: p.write_bytes(bytes(flac))),
        "empty.wav": ("is not a readable audio file", lambda p: p.write_bytes(b"")),
        "notes.wav": ("is not a readable audio file",
                      lambda p: p.write_text("these are notes, not audio\n" * 20)),
        "silent_film.mp4": ("has no audio stream", media.video_only),
    }
    for name, (message, write) in cases.items():
        write(tmp_path / name)
        with pytest.raises(AudioReadError, match=message) as error:
            read_audio(tmp_path / name)
        assert "\n" not in str(error.value) and str(tmp_path / name) in str(error.value)


@pytest.mark.parametrize("label", ["AAC in M4A", "PCM 16-bit WAV"])
def test_max_duration_decodes_only_the_start(format_files, label):
    whole = read_audio(format_files[label]).samples
    start = read_audio(format_files[label], max_duration=1.25).samples
    assert len(start) == 20000
    np.testing.assert_allclose(start[:19800], whole[:19800], atol=1e-4)


def test_every_channel_counts_the_same_in_the_downmix(tmp_path):
    """5.1 is averaged over all six channels (upstream's mean), not folded down with FFmpeg's
    centre and surround weights."""
    x = np.zeros((6, 48000), np.float32)
    x[3] = 0.6  # the LFE channel alone
    path = media.encode(tmp_path / "lfe.m4a", "alac", rate=48000, channels=6, samples=x)
    audio = read_audio(path).samples
    np.testing.assert_allclose(audio[2000:14000], 0.1, atol=1e-3)
