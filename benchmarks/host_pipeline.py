"""Can one host feed its accelerators? Extraction's host side, measured with the model taken out.

    python -m benchmarks.host_pipeline [--clips 24] [--seconds 10] [--output FILE.json]

1. Audio decoding per core, by format: `read_audio` (decode, downmix, resample to 16 kHz) over
   clips written in each format, one after another in this process.
2. `extract` with the tiny model (its compute is small; its semantic chunk and latent width set to
   the released model's, so a clip is cut into as many windows and stored as large), over 16 kHz
   WAV (nearly free to decode) and over MP3, from its first clip to its last (model loading,
   compiling and the final merge left out), with the main thread's time per clip split into waiting
   for decoded audio, encoding (cutting windows, starting batches, placing results), waiting for
   the tiny model's results (on this CPU: on an accelerator that time is the chips'), and the rest
   (the loop's own bookkeeping, waiting for the records thread); and the records thread's time
   (writing records and statistics, beside the main thread). The split is a guide only: placing
   batches on the device and fetching results happen inside the model's calls.
3. The main process alone: `extract` with the model taken out entirely (each stage's inputs placed
   on the devices, zeros of its output's shapes back) over decoded audio held in memory, in a
   process whose CPU is split into 8 devices like a v5e-8 host's chips, `--alone_clips` clips,
   `--trials` times; then two such processes side by side (`extract --num_processes 2
   --process_id I`, independent), each over half the clips and 4 of the devices. Other work on the
   machine only slows a run, so the best run is the ceiling.
4. The host's ceiling: decoding spread over every core, and the main process alone; against the
   chips' projected speed from a `plan` results file (`--plan`, default the v5e-8 one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import jax
import numpy as np
import soundfile as sf

from losatok_jax import _execution, _shards, checkpoint, extract, runners
from losatok_jax.audio_io import read_audio
from losatok_jax.config import RELEASED_CONFIG, load_config
from losatok_jax.model import Losatok, init_params

TINY_CONFIG = "tests/data/golden/tiny_chunk40/config.yml"
PLAN = "benchmarks/results/plan-v5e-8.json"
# A v5e-8 host (ct5lp-hightpu-8t): 224 vCPUs, 112 physical cores, for 8 chips.
V5E_HOST_CORES = 112
HOST_DEVICES = 8  # the CPU split into as many devices as a v5e-8 host has chips


def _noise(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)


def _pyav(path: Path, codec: str, samples: np.ndarray, rate: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp",
                                           layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


FORMATS = {  # name: (suffix, rate, channels, writer)
    "wav 16 kHz mono": (".wav", 16000, 1, lambda p, x, r: sf.write(p, x, r)),
    "wav 44.1 kHz stereo": (".wav", 44100, 2, lambda p, x, r: sf.write(p, x, r)),
    "flac 44.1 kHz stereo": (".flac", 44100, 2, lambda p, x, r: sf.write(p, x, r)),
    "mp3 44.1 kHz stereo": (".mp3", 44100, 2,
                            lambda p, x, r: sf.write(p, x, r, format="MP3")),
    "ogg vorbis 44.1 kHz stereo": (".ogg", 44100, 2,
                                   lambda p, x, r: sf.write(p, x, r, subtype="VORBIS")),
    "aac (m4a) 44.1 kHz stereo": (".m4a", 44100, 2, lambda p, x, r: _pyav(p, "aac", x, r)),
    "opus (webm) 48 kHz stereo": (".webm", 48000, 2, lambda p, x, r: _pyav(p, "libopus", x, r)),
}


def write_corpus(folder: Path, name: str, clips: int, seconds: float) -> list[Path]:
    suffix, rate, channels, write = FORMATS[name]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(clips):
        path = folder / f"clip{i:04d}{suffix}"
        write(path, _noise(seconds, rate, channels, seed=i), rate)
        paths.append(path)
    return paths


def host_side_config():
    """The tiny model with the released semantic chunk (252 tokens), so that clips are cut into
    as many windows as the released model cuts them, and the released latent width (128), so
    that each record is as large: the host's work per clip is the same, the model's is next to
    nothing."""
    tiny, released = load_config(TINY_CONFIG), load_config(RELEASED_CONFIG)
    return dataclasses.replace(
        tiny, decoder_dim=released.decoder_dim, semantic=dataclasses.replace(
            tiny.semantic, target_length=released.semantic.target_length))


def decode_rate(paths: list[Path]) -> float:
    """Audio seconds decoded to 16 kHz mono per second, on one core."""
    start, audio = time.perf_counter(), 0.0
    for path in paths:
        audio += len(read_audio(path, 16000).samples) / 16000
    return audio / (time.perf_counter() - start)


class _Timer:
    """Adds up the time spent in the calls it wraps (a call inside another call of the same
    key counts once)."""

    def __init__(self):
        self.seconds = {"waiting for decoded audio": 0.0, "encoding": 0.0,
                        "running the tiny model": 0.0, "records thread": 0.0}
        self._inside: set[str] = set()

    def mark_end(self, function):
        def marked(*args, **kwargs):
            self.end = time.perf_counter()  # the clips' loop is over
            return function(*args, **kwargs)
        return marked

    def wrap(self, key: str, function):
        def timed(*args, **kwargs):
            if key in self._inside:
                return function(*args, **kwargs)
            self._inside.add(key)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self._inside.discard(key)
        return timed

    def wrap_iterator(self, key: str, generator_function):
        def timed(*args, **kwargs):
            self.start = time.perf_counter()  # the clips' loop starts
            items = generator_function(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.seconds[key] += time.perf_counter() - start
                yield item
        return timed


class _MeshRunnerWithoutModel(runners.MeshRunner):
    """A mesh runner's host side without its model: each stage's inputs are placed on the
    devices as `MeshRunner` places them, and its outputs are zeros of the shapes the stage would
    return (worked out once per shape, for every run of the process), so that `extract` runs at
    the speed of the host's own work."""

    _zeros: dict = {}

    def call(self, stage, shared: tuple, batched: tuple, **static):
        batched = self.place_rows(batched)
        key = runners._call_key(stage, static, shared, batched)
        if key not in self._zeros:
            program = self._mapped(*runners._program_key(stage, shared, batched, static))
            self._zeros[key] = jax.tree.map(
                lambda spec: jax.device_put(np.zeros(spec.shape, spec.dtype),
                                            self.batch_sharding),
                jax.eval_shape(program, self.model, *shared, *batched))
        return self._zeros[key]


def _extract_patched(patches, checkpoint_dir: Path, audio: Path, out: Path, *options) -> str:
    """`extract` over `audio` with each (owner, name, replacement) of `patches` in place for the
    run; returns its summary line."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = extract.main(["--model_path", str(checkpoint_dir), "--input", str(audio),
                                   "--output_dir", str(out), *options])
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    assert status == 0, stdout.getvalue()
    return stdout.getvalue().strip().splitlines()[-1]


def extract_without_model(checkpoint_dir: Path, audio: Path, out: Path,
                          decoded: dict[str, object], *options: str) -> float:
    """Audio-seconds per second from `extract`'s first clip to its last with the model taken out
    and each clip's decoded audio (`decoded`, by file name) handed over from memory: the main
    process alone, over the clips this process took (its share, with `--num_processes`)."""
    timer = _Timer()
    samples = 0

    def from_memory(entries, workers, *load_args):
        nonlocal samples
        for entry in entries:
            clip = decoded[os.path.basename(entry.path)]
            samples += len(clip.samples)
            yield entry, clip, None

    _extract_patched([(runners, "MeshRunner", _MeshRunnerWithoutModel),
                      (extract, "_prefetched", timer.wrap_iterator("waiting for decoded audio",
                                                                   from_memory)),
                      (_shards, "merge", timer.mark_end(_shards.merge))],
                     checkpoint_dir, audio, out, *options)
    return samples / 16000 / (timer.end - timer.start)


def main_process_alone(checkpoint_dir: Path, corpus: list[Path], work: Path, clips: int,
                       trials: int, processes: int = 1, process_id: int = 0) -> dict:
    """`extract_without_model` over `clips` names for the corpus' files (links, each its own
    clip), `trials` times after a first run that works out the stages' shapes; as process
    `process_id` of `processes` independent ones, over its share of the clips. Run in a process
    whose CPU shows `HOST_DEVICES` devices, batches are placed and cut as a v5e-8 host's are."""
    folder = work / f"{clips}-clips"
    folder.mkdir()
    names = [f"clip{i:05d}{corpus[0].suffix}" for i in range(clips)]
    for i, name in enumerate(names):
        (folder / name).symlink_to(corpus[i % len(corpus)])
    samples = {path.name: read_audio(path, 16000) for path in corpus}
    decoded = {name: samples[corpus[i % len(corpus)].name] for i, name in enumerate(names)}
    options = ("--num_processes", str(processes), "--process_id", str(process_id))
    extract_without_model(checkpoint_dir, folder, work / "out-warm-up", decoded, *options)
    rates = [extract_without_model(checkpoint_dir, folder, work / f"out-{trial}", decoded,
                                   *options)
             for trial in range(trials)]
    return {"devices": jax.local_device_count(), "clips": clips, "trials": trials,
            "audio_seconds_per_second": rates,
            "median_audio_seconds_per_second": statistics.median(rates),
            "best_audio_seconds_per_second": max(rates)}


def extract_split(checkpoint_dir: Path, audio: Path, out: Path, workers: int) -> dict:
    """One `extract` run with the main process's time split by what it waited on."""
    timer = _Timer()
    patches = [(_execution, "encode_clips", timer.wrap("encoding", _execution.encode_clips)),
               (_shards.GroupWriter, "write",
                timer.wrap("records thread", _shards.GroupWriter.write)),
               (extract, "_prefetched",
                timer.wrap_iterator("waiting for decoded audio", extract._prefetched)),
               (_shards, "merge", timer.mark_end(_shards.merge))] + [
                   (runners.Runner, name, timer.wrap("running the tiny model",
                                                     getattr(runners.Runner, name)))
                   for name in ("window_peaks", "encode_windows", "to_host")]
    start = time.perf_counter()
    summary = _extract_patched(patches, checkpoint_dir, audio, out, "--num_workers", str(workers))
    wall = time.perf_counter() - start
    clips = len(list(audio.iterdir()))
    loop = timer.end - timer.start
    split = {key: value / clips for key, value in timer.seconds.items()}
    split["encoding"] -= split["running the tiny model"]  # cutting, starting, placing
    records = split.pop("records thread")
    split["everything else"] = loop / clips - sum(split.values())
    split["records thread (beside the main thread)"] = records
    return {"clips": clips, "wall_s": wall, "loop_s": loop, "main_process_s_per_clip": split,
            "summary": summary}


def _main_process_alone_in_child(checkpoint_dir: Path, corpus: list[Path], work: Path,
                                 clips: int, trials: int, processes: int = 1) -> dict:
    """`main_process_alone` in `processes` fresh processes side by side, each over its share
    of the clips and of the `HOST_DEVICES` devices the CPU is split into (as several `extract`
    processes on one host would each take some of its chips), once what the earlier
    measurements wrote is on disk (its write-back would slow this one). Their rates are added
    trial by trial: the processes run the same trials side by side."""
    os.sync()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
        f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={HOST_DEVICES // processes}").strip()}
    children = []
    for process in range(processes):
        folder = work / str(process)
        folder.mkdir()
        # Output to files: a full pipe would stall one child while another is read.
        with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
            children.append((folder, subprocess.Popen(
                [sys.executable, "-m", "benchmarks.host_pipeline", "--main_process_alone",
                 str(checkpoint_dir), str(folder), "--clips", str(clips), "--trials",
                 str(trials), "--processes", str(processes), "--process_id", str(process),
                 "--corpus", *map(str, corpus)], env=env, stdout=stdout, stderr=stderr)))
    results = []
    for folder, child in children:
        assert child.wait() == 0, (folder / "stderr").read_text()[-2000:]
        results.append(json.loads((folder / "stdout").read_text().strip().splitlines()[-1]))
    rates = [sum(trial) for trial in zip(*(r["audio_seconds_per_second"] for r in results))]
    return {"processes": processes, "devices_per_process": results[0]["devices"],
            "clips": clips, "trials": trials, "audio_seconds_per_second": rates,
            "median_audio_seconds_per_second": statistics.median(rates),
            "best_audio_seconds_per_second": max(rates)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--alone_clips", type=int, default=1024,
                        help="clips per run of the main process alone")
    parser.add_argument("--trials", type=int, default=9,
                        help="runs of the main process alone")
    parser.add_argument("--plan", default=PLAN, help="a plan --json results file")
    parser.add_argument("--output", default=None)
    parser.add_argument("--main_process_alone", nargs=2, metavar=("CHECKPOINT", "WORK"),
                        help=argparse.SUPPRESS)  # the child process of that measurement
    parser.add_argument("--corpus", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.main_process_alone:
        checkpoint_dir, work = map(Path, args.main_process_alone)
        print(json.dumps(main_process_alone(checkpoint_dir, [Path(p) for p in args.corpus],
                                            work, args.clips, args.trials, args.processes,
                                            args.process_id)))
        return
    cores = len(os.sched_getaffinity(0))
    results = {"host_cores": cores, "clip_seconds": args.seconds, "clips": args.clips,
               "decode_audio_seconds_per_second_per_core": {}}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        config = host_side_config()
        checkpoint.save(work / "ckpt", Losatok(init_params(config, jax.random.key(0)), config))
        corpora = {}
        for name in FORMATS:
            corpora[name] = write_corpus(work / name.split()[0] / name.replace(" ", "_"), name,
                                         args.clips, args.seconds)
            if name == "wav 16 kHz mono":  # first, on a machine that nothing else has busied
                alone = {}
                for processes in (1, 2):
                    (work / f"alone-{processes}").mkdir()
                    alone[processes] = _main_process_alone_in_child(
                        work / "ckpt", corpora[name], work / f"alone-{processes}",
                        args.alone_clips, args.trials, processes)
                    print(f"main process alone, {processes} process(es): "
                          f"{alone[processes]['best_audio_seconds_per_second']:,.0f} "
                          f"audio-s/s at best, "
                          f"{alone[processes]['median_audio_seconds_per_second']:,.0f} median "
                          f"({args.trials} runs of {args.alone_clips} clips)", flush=True)
            rate = decode_rate(corpora[name])
            results["decode_audio_seconds_per_second_per_core"][name] = rate
            print(f"decode {name}: {rate:,.0f} audio-s/s per core", flush=True)
        results["main_process_alone"] = alone[1]
        results["two_main_processes_alone"] = alone[2]
        results["extract_tiny_model"] = {}
        for name in ("wav 16 kHz mono", "mp3 44.1 kHz stereo"):
            folder = corpora[name][0].parent
            for trial in ("warm-up", name):  # the first run compiles
                run = extract_split(work / "ckpt", folder, work / f"out-{trial}-{name[:3]}",
                                    cores)
            run["audio_seconds_per_second"] = args.clips * args.seconds / run["loop_s"]
            results["extract_tiny_model"][name] = run
            print(f"extract over {name}: {run['audio_seconds_per_second']:,.0f} audio-s/s; "
                  f"main process per clip: " + ", ".join(
                      f"{k} {1e3 * v:.1f} ms" for k, v in run["main_process_s_per_clip"].items()),
                  flush=True)
    # Other work on a shared machine only slows a run down: the best run is the host's ceiling.
    results["main_process_ceiling_audio_seconds_per_second"] = \
        alone[1]["best_audio_seconds_per_second"]
    results["two_main_processes_ceiling_audio_seconds_per_second"] = \
        alone[2]["best_audio_seconds_per_second"]
    if Path(args.plan).exists():
        report = json.loads(Path(args.plan).read_text())
        realtime = min(row["realtime_per_chip"] for row in report["programs"]
                       if row["operation"] == "encode")
        results["chips"] = {"plan": args.plan, "target": report["target"],
                            "chips_per_host": report["chips"] // report["hosts"],
                            "slowest_encode_realtime_per_chip": realtime,
                            "audio_seconds_per_second_per_host":
                                realtime * report["chips"] // report["hosts"]}
        results["v5e_host_cores"] = V5E_HOST_CORES
        results["v5e_host_decode_ceiling_audio_seconds_per_second"] = {
            name: rate * V5E_HOST_CORES
            for name, rate in results["decode_audio_seconds_per_second_per_core"].items()}
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
