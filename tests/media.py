"""Audio files as users hold them, written by the tests: every codec and container in question
through FFmpeg's encoders (PyAV), the same through the ffmpeg command line (as most users' files
are made: other start times, priming and pre-skip), Vorbis through libsndfile, and variants that
are cut short, damaged or hold no audio."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import soundfile as sf

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def tones(seconds: float, rate: int, channels: int, seed: int = 0,
          silent_start: float = 0.0) -> np.ndarray:
    """(channels, samples) float32: a modulated tone per channel plus noise, peak about 0.4."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    out = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t)
                    * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
                    + 0.05 * rng.standard_normal(len(t)) for c in range(channels)])
    out[:, :int(silent_start * rate)] = 0.0
    return out.astype(np.float32)


def encode(path: Path, codec: str, *, rate: int = 44100, channels: int = 2, seconds: float = 3.0,
           container: str | None = None, video: bool = False, options: dict | None = None,
           qscale: int | None = None, samples=None) -> Path:
    """Writes `samples` (default: `tones`; an array (channels, n) or an iterable of them, for
    files longer than memory) with FFmpeg's `codec` into `path` (container from the suffix, or
    `container`); `video` adds a video stream beside the audio."""
    blocks = [tones(seconds, rate, channels)] if samples is None else samples
    blocks = [blocks] if isinstance(blocks, np.ndarray) else blocks
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        picture = None
        if video:
            picture = out.add_stream("mpeg4", rate=25)
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        stream = out.add_stream(codec, rate=rate, layout=LAYOUTS[channels])
        ctx = stream.codec_context
        if qscale is not None:
            ctx.qscale = qscale
        elif not ctx.codec.name.startswith(("pcm_", "flac", "alac")):
            ctx.bit_rate = 64000 * channels
        ctx.open()
        resampler = av.AudioResampler(format=ctx.format.name, layout=LAYOUTS[channels],
                                      rate=rate, frame_size=ctx.frame_size or None)
        for x in blocks:
            for start in range(0, x.shape[1], 4096):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(x[:, start:start + 4096], np.float32), format="fltp",
                    layout=LAYOUTS[channels])
                frame.sample_rate = rate
                for piece in resampler.resample(frame):
                    out.mux(stream.encode(piece))
        for piece in resampler.resample(None):
            out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
        if picture is not None:
            for i in range(int(seconds * 25)):
                image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 7 * i % 255, np.uint8),
                                                   format="rgb24")
                image.pts = i
                out.mux(picture.encode(image))
            out.mux(picture.encode(None))
    return path


def video_only(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as out:
        picture = out.add_stream("mpeg4", rate=25)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * 25)):
            image = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            image.pts = i
            out.mux(picture.encode(image))
        out.mux(picture.encode(None))
    return path


def sndfile(path: Path, *, rate: int = 44100, channels: int = 2, seconds: float = 3.0,
            format: str = "WAV", subtype: str = "PCM_16") -> Path:
    sf.write(path, tones(seconds, rate, channels).T, rate, format=format, subtype=subtype)
    return path


def ffmpeg_cli(path: Path, codec: str, *, rate: int = 22050, channels: int = 1,
               seconds: float = 3.0) -> Path:
    """`ffmpeg -i speech.wav -c:a CODEC path`, as a user makes a file (the container from the
    suffix, the codec's default settings), from a WAV of `tones` at `rate`."""
    source = path.with_name(path.name + ".source.wav")
    sf.write(source, tones(seconds, rate, channels).T, rate, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-c:a", codec, str(path)],
                   check=True)
    source.unlink()
    return path


HAS_FFMPEG_CLI = shutil.which("ffmpeg") is not None

# name -> (writer, keywords): every format the reader must decode as upstream's reader does.
FORMATS = {
    "AAC in M4A": ("encode", dict(name="aac.m4a", codec="aac")),
    "ALAC in M4A": ("encode", dict(name="alac.m4a", codec="alac")),
    "AAC 5.1 in M4A": ("encode", dict(name="surround.m4a", codec="aac", channels=6, rate=48000)),
    "AAC in ADTS": ("encode", dict(name="raw.aac", codec="aac", container="adts")),
    "AAC in MP4 beside video": ("encode", dict(name="video.mp4", codec="aac", video=True)),
    "Opus in WebM": ("encode", dict(name="opus.webm", codec="libopus", rate=48000)),
    "Opus in Ogg": ("encode", dict(name="speech.opus", codec="libopus", rate=48000,
                                   container="ogg")),
    "Vorbis in Ogg": ("sndfile", dict(name="vorbis.ogg", format="OGG", subtype="VORBIS",
                                      rate=48000)),
    "MP3": ("encode", dict(name="cbr.mp3", codec="libmp3lame")),
    "MP3, VBR, no Xing header": ("encode", dict(name="vbr.mp3", codec="libmp3lame", qscale=2,
                                                options={"write_xing": "0"})),
    "FLAC": ("encode", dict(name="lossless.flac", codec="flac", rate=48000)),
    "WMA in ASF": ("encode", dict(name="old.wma", codec="wmav2", container="asf")),
    "PCM 16-bit WAV": ("sndfile", dict(name="pcm16.wav")),
    "PCM 8-bit telephony WAV": ("sndfile", dict(name="phone.wav", rate=8000, channels=1,
                                                subtype="PCM_U8")),
    "PCM 24-bit AIFF": ("sndfile", dict(name="pcm24.aiff", format="AIFF", subtype="PCM_24")),
    # The same codecs as the ffmpeg command line writes them (Debian 12 ships ffmpeg 5.1): its
    # WebM starts at a negative time with half the Opus pre-skip in CodecDelay, its MP3 and AAC
    # carry encoder priming, its MP4 Opus an edit list.
    "Opus in WebM (ffmpeg CLI)": ("ffmpeg", dict(name="cli-opus.webm", codec="libopus")),
    "Opus in Matroska (ffmpeg CLI)": ("ffmpeg", dict(name="cli-opus.mka", codec="libopus",
                                                      channels=2)),
    "Opus in Ogg (ffmpeg CLI)": ("ffmpeg", dict(name="cli.opus", codec="libopus")),
    "Opus in MP4 (ffmpeg CLI)": ("ffmpeg", dict(name="cli-opus.mp4", codec="libopus")),
    "Vorbis in Ogg (ffmpeg CLI)": ("ffmpeg", dict(name="cli-vorbis.ogg", codec="libvorbis")),
    "Vorbis in WebM (ffmpeg CLI)": ("ffmpeg", dict(name="cli-vorbis.webm", codec="libvorbis",
                                                    rate=44100, channels=2)),
    "AAC in M4A (ffmpeg CLI)": ("ffmpeg", dict(name="cli-aac.m4a", codec="aac", rate=44100)),
    "AAC in ADTS (ffmpeg CLI)": ("ffmpeg", dict(name="cli.aac", codec="aac")),
    "AAC in Matroska (ffmpeg CLI)": ("ffmpeg", dict(name="cli-aac.mkv", codec="aac")),
    "MP3 (ffmpeg CLI)": ("ffmpeg", dict(name="cli.mp3", codec="libmp3lame")),
    "MP3 in Matroska (ffmpeg CLI)": ("ffmpeg", dict(name="cli-mp3.mkv", codec="libmp3lame",
                                                     rate=44100, channels=2)),
}


def write_format(folder: Path, label: str) -> Path | None:
    """The file of format `label` in `folder`; None for a command-line file without ffmpeg."""
    kind, keywords = FORMATS[label]
    keywords = dict(keywords)
    path = folder / keywords.pop("name")
    if kind == "sndfile":
        return sndfile(path, **keywords)
    if kind == "ffmpeg":
        return ffmpeg_cli(path, **keywords) if HAS_FFMPEG_CLI else None
    if label.startswith("MP3, VBR"):  # a silent start makes the first frames small: libsndfile
        keywords["samples"] = tones(3.0, 44100, 2, silent_start=1.0)  # estimates far too long
    return encode(path, **keywords)
