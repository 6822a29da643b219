"""Host decoding: how fast files become 16 kHz mono float32, against the ffmpeg command line and
librosa.load (upstream's reader), and the peak memory of a 3-hour M4A.

    python -m benchmarks.decoding                       # 60 s files, 3 repeats, and 3 hours of M4A
    python -m benchmarks.decoding --seconds 10 --no-long

Every reader runs in this one process on one thread (`OMP_NUM_THREADS`-style limits do not apply
to FFmpeg's CLI: it gets `-threads 1`), so × realtime is per core. The command line pays its
process start-up once per file; its rows also give × realtime without it. It does the same job (decode, downmix to mono, resample to 16 kHz, float32 to a pipe) with its default
resampler and, where it was built with libsoxr, with soxr (our resampler). The 3-hour file is
read by `losatok_jax.audio_io.read_audio` in a child process under `/usr/bin/time -v`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


from benchmarks.report import _cpu_model
from benchmarks.workloads import child_env

import media  # noqa: E402  (tests/, put on the path by benchmarks.workloads)

# label -> (file name, codec, rate, container)
FILES = {
    "WAV (PCM 16)": ("pcm.wav", "pcm_s16le", 44100, None),
    "FLAC": ("lossless.flac", "flac", 48000, None),
    "MP3": ("lossy.mp3", "libmp3lame", 44100, None),
    "M4A/AAC": ("lossy.m4a", "aac", 44100, None),
    "Opus (WebM)": ("lossy.webm", "libopus", 48000, None),
}


def _ffmpeg_command(path: Path, soxr: bool) -> list[str]:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-i", str(path), "-ac", "1"]
    if soxr:
        command += ["-af", "aresample=16000:resampler=soxr"]
    return command + ["-ar", "16000", "-f", "f32le", "-"]


def _ffmpeg_has_soxr() -> bool:
    done = subprocess.run(["ffmpeg", "-hide_banner", "-buildconf"], capture_output=True, text=True)
    return "libsoxr" in done.stdout


def readers(path: Path) -> dict:
    """name -> a function that decodes `path` to 16 kHz mono and returns the sample count."""
    from losatok_jax.audio_io import read_audio

    def ours():
        return len(read_audio(path).samples)

    def librosa_load():
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return len(librosa.load(path, sr=16000, mono=True)[0])

    def ffmpeg(soxr):
        def run():
            done = subprocess.run(_ffmpeg_command(path, soxr), capture_output=True, check=True)
            return len(done.stdout) // 4
        return run

    found = {"losatok_jax.audio_io": ours, "librosa.load": librosa_load}
    if shutil.which("ffmpeg"):
        found["ffmpeg CLI"] = ffmpeg(False)
        if _ffmpeg_has_soxr():
            found["ffmpeg CLI (soxr)"] = ffmpeg(True)
    return found


def ffmpeg_startup(folder: Path, repeats: int) -> float:
    """The ffmpeg command line's own start-up: the best time to decode 0.1 s of audio."""
    tiny = media.sndfile(folder / "tiny.wav", rate=16000, channels=1, seconds=0.1)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        subprocess.run(_ffmpeg_command(tiny, False), capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def time_readers(folder: Path, seconds: float, repeats: int) -> list[dict]:
    startup = ffmpeg_startup(folder, repeats) if shutil.which("ffmpeg") else 0.0
    rows = []
    for label, (name, codec, rate, container) in FILES.items():
        path = folder / name
        if not path.exists():
            media.encode(path, codec, rate=rate, channels=2, seconds=seconds, container=container)
        for reader, run in readers(path).items():
            run()  # warm: imports, page cache
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            best = min(times)
            row = {"format": label, "rate": rate, "channels": 2, "seconds": seconds,
                   "reader": reader, "best_s": best, "files_per_s": 1 / best,
                   "x_realtime_per_core": seconds / best}
            if reader.startswith("ffmpeg"):  # the process's start-up, paid once per file
                row["startup_s"] = startup
                row["x_realtime_per_core_without_startup"] = seconds / (best - startup)
            rows.append(row)
            print(f"{label:14s} {reader:22s} {best:7.3f} s  {seconds / best:8.1f}x realtime",
                  flush=True)
    return rows


def long_file_memory(folder: Path, hours: float) -> dict:
    """Peak RSS of reading `hours` of 44.1 kHz stereo AAC (M4A), against its 16 kHz size."""
    path = folder / "long.m4a"
    block_seconds = 60.0
    if not path.exists():
        blocks = (media.tones(block_seconds, 44100, 2, seed=i)
                  for i in range(int(hours * 3600 / block_seconds)))
        media.encode(path, "aac", rate=44100, channels=2, samples=blocks)
    code = ("import sys; from losatok_jax.audio_io import read_audio; "
            "a = read_audio(sys.argv[1]).samples; print(len(a))")
    baseline = ("import sys; import losatok_jax.audio_io, av, soxr, numpy; "
                "print(0)")
    measured = {}
    for name, script in (("read", code), ("imports only", baseline)):
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script, str(path)],
                              capture_output=True, text=True, env=child_env("cpu"), check=True)
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
        measured[name] = {"peak_rss_gb": peak * 1024 / 1e9,
                          "seconds": time.perf_counter() - start,
                          "samples": int(done.stdout.split()[-1])}
    samples = measured["read"]["samples"]
    return {"hours": hours, "file_gb": path.stat().st_size / 1e9, "samples_16k": samples,
            "decoded_16k_gb": samples * 4 / 1e9, **measured,
            "peak_over_decoded": measured["read"]["peak_rss_gb"] / (samples * 4 / 1e9)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each timed file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hours", type=float, default=3.0, help="length of the long M4A")
    parser.add_argument("--no-long", dest="long", action="store_false",
                        help="skip the long file's memory")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) /
                        "losatok-bench" / "decoding")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    folder = args.workdir / f"{args.seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    results = {"machine": _cpu_model(), "ffmpeg": _ffmpeg_version(),
               "rows": time_readers(folder, args.seconds, args.repeats)}
    if args.long:
        results["long_m4a"] = long_file_memory(args.workdir, args.hours)
        print(json.dumps(results["long_m4a"], indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _ffmpeg_version() -> str | None:
    if not shutil.which("ffmpeg"):
        return None
    done = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True)
    return done.stdout.split("\n")[0]


if __name__ == "__main__":
    sys.exit(main())
