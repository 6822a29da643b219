"""Reading any audio file into the model's input format, and writing its output safely.

LoSATok takes mono float32 audio at 16 kHz. `load_audio` turns whatever libsndfile decodes (WAV,
FLAC, OGG/Vorbis/Opus, MP3, ...) into that, and reports every file it cannot trust with one
`AudioReadError` whose message fits on one line, so a command-line tool can print it as is.

`save_audio` writes 32-bit float WAV (subtype FLOAT): the decoder's float32 output is stored
exactly (after clipping to [-1, 1]), which 16-bit PCM would quantise. It writes a temporary file
beside the target and renames it over the target only once complete, so a failed write never
leaves a partial file or damages an existing one.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from losatok_jax.errors import LosatokError

# Suffixes (lower case) of the files that folder inputs pick up.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif",
                            ".au", ".caf", ".w64", ".rf64"})

# Streaming encoders (espeak-ng, sox or ffmpeg writing to a pipe) cannot know the length when they
# write the header and leave a huge placeholder; a data size this large says nothing.
_STREAMING_DATA_SIZE = 0x7F000000


class AudioReadError(LosatokError):
    """An input file that is missing, unreadable, damaged, truncated, empty or not finite."""


class AudioWriteError(LosatokError):
    """An output file (audio, or another output of the same run) that cannot be written."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _libsndfile_message(error: Exception) -> str:
    return _one_line(getattr(error, "error_string", error))


def _wav_missing_bytes(path: Path) -> int:
    """Bytes of sample data a RIFF WAV header promises beyond the end of the file.

    libsndfile silently reads a truncated WAV up to where it stops; only the header's data size
    tells that the file was cut (an interrupted download or copy).
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"RIFF":
            return 0
        f.seek(12)  # past "RIFF", the RIFF size and "WAVE"
        while len(header := f.read(8)) == 8:
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                if size >= _STREAMING_DATA_SIZE:
                    return 0
                return max(0, size - (file_size - f.tell()))
            f.seek(size + size % 2, os.SEEK_CUR)  # chunks are padded to even sizes
    return 0


def load_audio(path: str | os.PathLike, sample_rate: int = 16000,
               max_duration: float | None = None) -> np.ndarray:
    """Reads an audio file as mono float32 (N,) at `sample_rate`, at most `max_duration` seconds.

    Channels are averaged; another file rate is resampled with soxr (librosa's "soxr_hq").
    With `max_duration`, only that much of the file is decoded.
    """
    if max_duration is not None and not max_duration > 0:
        raise ValueError(f"max_duration must be positive, got {max_duration}")
    path = Path(path)
    try:
        with open(path, "rb"):  # for a precise reason (missing, a directory, no permission)
            pass
    except OSError as e:
        raise AudioReadError(f"cannot read {path}: {e.strerror}") from None
    try:
        with sf.SoundFile(path) as f:
            file_rate, declared_frames = f.samplerate, f.frames
            wanted = declared_frames
            if max_duration is not None:
                wanted = min(wanted, math.ceil(max_duration * file_rate))
            try:
                frames = f.read(wanted, dtype="float32", always_2d=True)
            except sf.SoundFileError as e:
                raise AudioReadError(f"{path} is damaged: {_libsndfile_message(e)}") from None
            is_wav = f.format in ("WAV", "WAVEX")
    except (sf.SoundFileError, TypeError) as e:  # TypeError: headerless RAW needs a rate
        raise AudioReadError(
            f"{path} is not a readable audio file ({_libsndfile_message(e)})") from None
    if len(frames) < wanted:
        raise AudioReadError(f"{path} is truncated: only {len(frames)} of the {declared_frames} "
                             "frames its header declares could be decoded")
    missing = _wav_missing_bytes(path) if is_wav else 0
    if missing:
        raise AudioReadError(f"{path} is truncated: its header declares {missing} more bytes of "
                             "audio than the file holds")
    if frames.size == 0:
        raise AudioReadError(f"{path} holds no audio samples")
    if not np.all(np.isfinite(frames)):
        raise AudioReadError(f"{path} contains NaN or Inf samples")
    audio = frames.mean(axis=1)
    if file_rate != sample_rate:
        audio = librosa.resample(audio, orig_sr=file_rate, target_sr=sample_rate,
                                 res_type="soxr_hq")
    if max_duration is not None:
        audio = audio[:round(max_duration * sample_rate)]
    return np.asarray(audio, np.float32)


def _create_temp_sibling(path: Path) -> tuple[int, Path]:
    """A new, exclusively created file next to `path` (same file system, so rename is atomic)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # Mode 0o666 lets the umask decide permissions, as for any newly written file.
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
    except OSError as e:
        raise AudioWriteError(f"cannot write {path}: {e.strerror}") from None


def check_writable(path: str | os.PathLike) -> None:
    """Raises `AudioWriteError` now if `path` could not be written later (call before slow work).

    Creates and removes a temporary file beside `path`; an existing `path` is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioWriteError(f"cannot write {path}: it is a directory")
    fd, temp = _create_temp_sibling(path)
    os.close(fd)
    temp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yields a binary file that replaces `path` only if the block completes without error."""
    path = Path(path)
    fd, temp = _create_temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(temp, path)
    except OSError as e:
        raise AudioWriteError(f"cannot write {path}: {e.strerror}") from None
    finally:
        temp.unlink(missing_ok=True)


def save_audio(path: str | os.PathLike, audio, sample_rate: int = 16000) -> None:
    """Writes mono audio (N,) as a 32-bit float WAV, clipped to [-1, 1], whatever the extension."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"save_audio writes mono audio shaped (N,); got {audio.shape}")
    try:
        with atomic_write(path) as f:
            sf.write(f, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="FLOAT")
    except sf.SoundFileError as e:
        raise AudioWriteError(f"cannot write {path}: {_libsndfile_message(e)}") from None
