"""Extraction throughput: `python -m losatok_jax.extract` over a generated folder of clips.

    python -m benchmarks.extract_throughput --size full --clips 48     # random full-size weights
    python -m benchmarks.extract_throughput --size tiny --clips 400    # host pipeline overhead

Clips are 1-20 s of noise, a third of them at 44.1 kHz stereo so resampling and downmixing are
part of the measured pipeline. Reports audio hours per second as the CLI measures it (after the
model is loaded), and writes it to --output as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import soundfile as sf

from losatok_jax import checkpoint, extract
from losatok_jax.config import load_config
from losatok_jax.model import Losatok, init_params

TINY_CONFIG = "tests/data/golden/tiny_chunk40/config.yml"
FULL_CONFIG = "config/16k_16k_25Hz_losatok.yml"


def write_clips(folder: Path, count: int, seed: int = 0) -> float:
    """Writes `count` clips; returns their total duration in hours."""
    rng = np.random.default_rng(seed)
    seconds = 0.0
    for i in range(count):
        duration = rng.uniform(1.0, 20.0)
        if i % 3 == 0:
            audio = 0.1 * rng.standard_normal((int(duration * 44100), 2))
            sf.write(folder / f"clip{i:05d}.flac", audio, 44100)
        else:
            sf.write(folder / f"clip{i:05d}.wav", 0.1 * rng.standard_normal(int(duration * 16000)),
                     16000)
        seconds += duration
    return seconds / 3600


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "audio").mkdir()
        hours = write_clips(work / "audio", args.clips)
        config = load_config(TINY_CONFIG if args.size == "tiny" else FULL_CONFIG)
        checkpoint.save(work / "ckpt", Losatok(init_params(config, jax.random.key(0)), config))
        start = time.perf_counter()
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            status = extract.main(["--model_path", str(work / "ckpt"), "--input",
                                   str(work / "audio"), "--output_dir", str(work / "out"),
                                   "--batch_size", str(args.batch_size)])
        wall = time.perf_counter() - start
    assert status == 0, stdout.getvalue()
    summary = stdout.getvalue().strip().splitlines()[-1]
    results = {"size": args.size, "device": jax.devices()[0].device_kind,
               "devices": jax.local_device_count(), "clips": args.clips, "audio_hours": hours,
               "wall_s_including_load_and_compile": wall, "cli_summary": summary}
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
