"""Reading any audio file into the model's input format, and writing its output safely.

LoSATok takes mono float32 audio at 16 kHz. `read_audio` and `load_audio` turn what upstream's
reader decodes (libsndfile's formats, and through FFmpeg's libraries every other audio format and
container, video files included) into that, the way upstream's reader does, and report every file
they cannot use with one `AudioReadError` whose message fits on one line, so a command-line tool
can print it as is. A file cut short is decoded up to where its data ends, and says so.

`save_audio` writes 32-bit float WAV (subtype FLOAT): the decoder's float32 output is stored
exactly (after clipping to [-1, 1]), which 16-bit PCM would quantise. It writes atomically
(`_files.atomic_write`), so a failed write never leaves a partial file or damages an existing
one.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf

from losatok_jax._files import OutputError, atomic_write
from losatok_jax.errors import LosatokError, one_line

# Suffixes (matched in any case) of the files that folder inputs pick up: what libsndfile reads,
# and what FFmpeg treats as audio or as a container that may hold audio (video files included:
# their first audio stream is read; one without audio is reported, not skipped).
AUDIO_SUFFIXES = frozenset({
    ".wav", ".wave", ".bwf", ".rf64", ".w64", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf",
    ".flac", ".ogg", ".oga", ".opus", ".spx", ".mp3", ".mp2", ".mpga", ".m4a", ".m4b", ".aac",
    ".adts", ".ac3", ".eac3", ".dts", ".amr", ".awb", ".3gp", ".3g2", ".wma", ".asf", ".wmv",
    ".webm", ".weba", ".mka", ".mkv", ".mp4", ".m4v", ".mov", ".qt", ".avi", ".flv", ".ts",
    ".mts", ".m2ts", ".mpg", ".mpeg", ".vob", ".ape", ".wv", ".tta", ".tak", ".mpc", ".ra",
    ".rm", ".gsm", ".voc", ".dsf", ".dff", ".caff"})

# Streaming encoders (espeak-ng, sox or ffmpeg writing to a pipe) cannot know the length when they
# write the header and leave a huge placeholder; a data size this large says nothing.
_STREAMING_DATA_SIZE = 0x7F000000


class AudioReadError(LosatokError):
    """An input file that is missing, unreadable, damaged, truncated, empty or not finite."""


def _libsndfile_message(error: Exception) -> str:
    return one_line(getattr(error, "error_string", error))


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


class Audio(NamedTuple):
    """A decoded file: mono float32 samples at the requested rate, and how many seconds of audio
    the file's header promises beyond where its data ends (0.0 for a whole file)."""

    samples: np.ndarray
    missing_seconds: float = 0.0


class TruncatedAudioWarning(UserWarning):
    """A file cut short: its audio was decoded up to where the data ends."""


def load_audio(path: str | os.PathLike, sample_rate: int = 16000,
               max_duration: float | None = None) -> np.ndarray:
    """`read_audio`'s samples; a file cut short gives one `TruncatedAudioWarning` naming it and
    how much is missing."""
    audio = read_audio(path, sample_rate, max_duration)
    if audio.missing_seconds:
        warnings.warn(truncation_message(path, audio, sample_rate), TruncatedAudioWarning,
                      stacklevel=2)
    return audio.samples


def truncation_message(path, audio: Audio, sample_rate: int) -> str:
    return (f"{path} is truncated: its header promises {audio.missing_seconds:.3f} s more audio "
            f"than the file holds; decoded the {len(audio.samples) / sample_rate:.3f} s it has")


def check_readable(path: str | os.PathLike) -> None:
    """Raises `AudioReadError` with the precise reason (missing, a directory, no permission) if
    `path` cannot be opened."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise AudioReadError(f"cannot read {path}: {e.strerror}") from None


def read_audio(path: str | os.PathLike, sample_rate: int = 16000,
               max_duration: float | None = None) -> Audio:
    """Decodes an audio file (or a video file's first audio stream) to mono float32 (N,) at
    `sample_rate`, at most `max_duration` seconds, as upstream's reader does.

    libsndfile reads what it can (WAV, FLAC, AIFF, OGG, MP3, ...); FFmpeg's decoders (through
    PyAV) read the rest (AAC, ALAC, Opus in WebM, WMA, ...). Channels are averaged, whatever the
    layout; another rate is resampled with soxr at librosa's "soxr_hq" quality, streaming, so
    memory holds the 16 kHz result and one block of the file, never the whole file at its own
    rate. The length is upstream's: ceil(frames · sample_rate / file rate).
    """
    if max_duration is not None and not max_duration > 0:
        raise LosatokError(f"max_duration must be positive, got {max_duration}")
    path = Path(path)
    check_readable(path)
    try:
        sndfile = sf.SoundFile(path)
    except (sf.SoundFileError, TypeError, RuntimeError) as e:  # TypeError: RAW needs a rate
        sndfile_error = _libsndfile_message(e)
    else:
        with sndfile:
            if sndfile.subtype in _FFMPEG_SUBTYPES:
                sndfile_error = f"{sndfile.subtype} is read through FFmpeg"
            else:
                try:
                    return _read_sndfile(sndfile, path, sample_rate, max_duration)
                except _SndfileReadError as e:  # as upstream's reader, FFmpeg gets a try
                    sndfile_error = str(e)
    return _read_ffmpeg(path, sample_rate, max_duration, sndfile_error)


class _SndfileReadError(Exception):
    """libsndfile opened a file but could not read it to the end."""


# libsndfile opens these, but FFmpeg decodes them better: libsndfile's reads of Ogg Opus in
# blocks shift the audio by the stream's pre-skip at every block (only one whole-file read is
# right), so streaming needs FFmpeg's decoder, which gives the whole-file read's samples.
_FFMPEG_SUBTYPES = ("OPUS",)


# Formats whose header frame count is exact: fewer decoded frames means the file was cut short.
# (MPEG and OGG counts are estimates from the bit rate: those decode to the end of the stream.)
_EXACT_LENGTH_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC")
_BLOCK_FRAMES = 1 << 16


def _read_sndfile(f: sf.SoundFile, path: Path, sample_rate: int,
                  max_duration: float | None) -> Audio:
    out = _MonoResampler(path, f.samplerate, sample_rate, max_duration, f.frames / f.samplerate)
    try:
        while not out.full:
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                break
            out.add(block)
    except (sf.SoundFileError, RuntimeError) as e:
        raise _SndfileReadError(_libsndfile_message(e)) from None
    missing = 0.0
    if f.format in ("WAV", "WAVEX"):  # libsndfile shortens a cut WAV's frame count silently
        missing = _wav_missing_bytes(path) / (f.channels * _sample_bytes(f.subtype)) / f.samplerate
    elif f.format in _EXACT_LENGTH_FORMATS and not out.full:
        missing = max(0, f.frames - out.frames_in) / f.samplerate
    return Audio(out.finish(), missing if max_duration is None else 0.0)


def _sample_bytes(subtype: str) -> int:
    bits = {"PCM_U8": 8, "PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32,
            "DOUBLE": 64, "ULAW": 8, "ALAW": 8}
    return bits.get(subtype, 16) // 8


# FFmpeg demuxers whose declared duration is exact (a shortfall means the file was cut short),
# and the shortfall that counts (the MP4 family's AAC may decode a little longer or shorter).
_EXACT_LENGTH_DEMUXERS = {"flac": 0.001, "wav": 0.001, "aiff": 0.001, "w64": 0.001,
                          "caf": 0.001, "mov,mp4,m4a,3gp,3g2,mj2": 0.05}


def _read_ffmpeg(path: Path, sample_rate: int, max_duration: float | None,
                 sndfile_error: str) -> Audio:
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        reason = one_line(getattr(e, "strerror", None) or e)
        raise AudioReadError(f"{path} is not a readable audio file ({reason}; libsndfile: "
                             f"{sndfile_error})") from None
    file_size = path.stat().st_size
    with container:
        if not container.streams.audio:
            raise AudioReadError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        declared = (float(stream.duration * stream.time_base) if stream.duration
                    else (container.duration or 0) / av.time_base)
        out, cut, start = None, False, None
        pending, pending_frames = [], 0
        threshold = _EXACT_LENGTH_DEMUXERS.get(container.format.name)
        exact = threshold is not None
        pre_skip = _OpusPreSkip.of(container, stream)
        try:
            for packet in container.demux(stream):
                if pre_skip is not None:
                    pre_skip.count(packet)
                try:
                    frames = packet.decode()
                except av.FFmpegError as e:
                    # The last packet of a file cut short ends at the end of the file.
                    if out is not None and packet.pos is not None and packet.pos >= 0 \
                            and packet.pos + packet.size >= file_size:
                        cut = True
                        break
                    raise AudioReadError(f"{path} is damaged: {one_line(e)}") from None
                for frame in frames:
                    if out is None:
                        out = _MonoResampler(path, frame.sample_rate, sample_rate, max_duration,
                                             declared)
                    elif frame.sample_rate != out.file_rate:
                        raise AudioReadError(f"{path} changes its sample rate mid-stream "
                                             f"({out.file_rate} -> {frame.sample_rate} Hz)")
                    if exact and frame.time is not None:
                        start = frame.time if start is None else start
                        _check_continuous(path, frame.time - start,
                                          (out.frames_in + pending_frames) / out.file_rate)
                    samples = _frame_samples(frame)
                    if pre_skip is not None:
                        samples = pre_skip.trim(samples)
                    pending.append(samples)
                    pending_frames += len(samples)
                if pending_frames >= _BLOCK_FRAMES:  # frames are small: work on blocks
                    out.add(np.concatenate(pending))
                    pending, pending_frames = [], 0
                    if out.full:
                        break
        except av.FFmpegError as e:  # demuxing
            raise AudioReadError(f"{path} is damaged: {one_line(e)}") from None
    if pending:
        out.add(np.concatenate(pending))
    if out is None:
        raise AudioReadError(f"{path} holds no audio samples")
    missing = 0.0
    if max_duration is None and (cut or exact):
        shortfall = declared - out.frames_in / out.file_rate
        if shortfall > (threshold or 0.001):
            missing = shortfall
    return Audio(out.finish(), missing)


class _OpusPreSkip:
    """Drops what FFmpeg's decoder leaves of an Opus stream's pre-skip in Matroska and WebM.

    An Opus stream starts with `pre-skip` samples (its ID header says how many) that are not
    audio. The ffmpeg 5.1 command line writes WebM whose CodecDelay and first block timestamp
    account for only half of them; the libraries PyAV bundles trust the container and drop only
    that half, while the ffmpeg 5.1 command line, which upstream's reader runs, drops the whole
    pre-skip, which also lines the audio up with its source. So the rest is dropped here: the
    decoder dropped what its first packets hold (their TOC bytes give the count, RFC 6716 §3.1)
    minus what its first frame returned.
    """

    def __init__(self, pre_skip: int):
        self.pre_skip, self.packet_samples, self.left = pre_skip, 0, None

    @classmethod
    def of(cls, container, stream) -> "_OpusPreSkip | None":
        """For Opus in Matroska or WebM, with the pre-skip its ID header ("OpusHead", RFC 7845
        §5.1) gives: a little-endian 16-bit count at byte 10."""
        context = stream.codec_context
        header = context.extradata or b""
        if context.name != "opus" or "matroska" not in container.format.name \
                or not header.startswith(b"OpusHead") or len(header) < 12:
            return None
        return cls(int.from_bytes(header[10:12], "little"))

    def count(self, packet) -> None:
        if self.left is None and packet.size:
            self.packet_samples += _opus_packet_samples(bytes(packet))

    def trim(self, samples: np.ndarray) -> np.ndarray:
        if self.left is None:
            if not len(samples):
                return samples
            dropped = self.packet_samples - len(samples)
            self.left = max(0, self.pre_skip - dropped)
        cut = min(self.left, len(samples))
        self.left -= cut
        return samples[cut:]


def _opus_packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) an Opus packet decodes to, from its TOC byte (RFC 6716, §3.1)."""
    config, code = packet[0] >> 3, packet[0] & 3
    if config < 12:  # SILK-only: 10, 20, 40 or 60 ms
        frame = (480, 960, 1920, 2880)[config % 4]
    elif config < 16:  # hybrid: 10 or 20 ms
        frame = (480, 960)[config % 2]
    else:  # CELT-only: 2.5, 5, 10 or 20 ms
        frame = (120, 240, 480, 960)[config % 4]
    frames = 1 if code == 0 else 2 if code in (1, 2) else packet[1] & 0x3F
    return frame * frames


def _check_continuous(path: Path, frame_time: float, decoded_seconds: float) -> None:
    """In a container that times every frame exactly, a frame that starts later than the audio
    decoded so far ends means frames in between were lost: damage, not a file cut short."""
    if frame_time - decoded_seconds > 0.01:
        raise AudioReadError(f"{path} is damaged: {frame_time - decoded_seconds:.3f} s of audio "
                             f"at {decoded_seconds:.3f} s could not be decoded")


def _frame_samples(frame) -> np.ndarray:
    """One decoded frame as float32 (samples, channels), integer formats scaled to [-1, 1)."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    array = array if frame.format.is_planar else array.reshape(-1, channels).T
    if array.dtype == np.uint8:
        array = (array.astype(np.float32) - 128.0) / 128.0
    elif array.dtype.kind == "i":
        array = array.astype(np.float32) / np.float32(2.0 ** (8 * array.dtype.itemsize - 1))
    return array.astype(np.float32, copy=False).T


class _MonoResampler:
    """Averages blocks of a file's channels and resamples them as they arrive (soxr's streaming
    resampler, librosa's default quality), into one buffer sized from the declared duration."""

    def __init__(self, path: Path, file_rate: int, sample_rate: int, max_duration: float | None,
                 declared_seconds: float):
        import soxr

        self.path, self.file_rate, self.sample_rate = path, file_rate, sample_rate
        self.max_duration = max_duration
        self.limit = math.inf if max_duration is None else math.ceil(max_duration * file_rate)
        self.frames_in = 0
        self.stream = (None if file_rate == sample_rate else
                       soxr.ResampleStream(file_rate, sample_rate, 1, dtype="float32",
                                           quality="HQ"))
        expected = min(declared_seconds or 0.0, max_duration or math.inf)
        # Room for what a declared duration leaves out (a codec's priming and padding), so that
        # the buffer is not grown, and copied, at the very end.
        self.buffer = np.empty(math.ceil(expected * sample_rate * 1.002) + sample_rate,
                               np.float32)
        self.length = 0

    @property
    def full(self) -> bool:
        return self.frames_in >= self.limit

    def add(self, block: np.ndarray) -> None:
        block = block[:max(0, min(len(block), self.limit - self.frames_in))]
        self.frames_in += len(block)
        channels = block.shape[1]
        # The mean of the channels, as one matrix-vector product (NaN and Inf carry through it).
        mono = block[:, 0] if channels == 1 else block @ np.full(channels, 1 / channels,
                                                                 np.float32)
        if not np.isfinite(mono).all():
            raise AudioReadError(f"{self.path} contains NaN or Inf samples")
        self._append(mono if self.stream is None else self.stream.resample_chunk(mono))

    def _append(self, samples: np.ndarray) -> None:
        end = self.length + len(samples)
        if end > len(self.buffer):  # the declared duration was an underestimate
            grown = np.empty(max(end, int(len(self.buffer) * 1.25) + 1024), np.float32)
            grown[:self.length] = self.buffer[:self.length]
            self.buffer = grown
        self.buffer[self.length:end] = samples
        self.length = end

    def finish(self) -> np.ndarray:
        if self.frames_in == 0:
            raise AudioReadError(f"{self.path} holds no audio samples")
        if self.stream is not None:
            self._append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        length = math.ceil(self.frames_in * self.sample_rate / self.file_rate)
        if self.max_duration is not None:
            length = min(length, round(self.max_duration * self.sample_rate))
        if length > self.length:
            self._append(np.zeros(length - self.length, np.float32))
        if length < len(self.buffer) // 2:  # a bit-rate estimate far above the real length
            return self.buffer[:length].copy()
        return self.buffer[:length]


def save_audio(path: str | os.PathLike, audio, sample_rate: int = 16000) -> None:
    """Writes mono audio (N,) as a 32-bit float WAV, clipped to [-1, 1], whatever the extension."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise LosatokError(f"save_audio writes mono audio shaped (N,); got {audio.shape}")
    try:
        with atomic_write(path) as f:
            sf.write(f, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="FLOAT")
    except sf.SoundFileError as e:
        raise OutputError(f"cannot write {path}: {_libsndfile_message(e)}") from None
