"""Peak memory of converting an upstream checkpoint, against the checkpoint's size.

    python -m benchmarks.convert_memory                  # the full-size model (a 3.2 GB .pth)
    python -m benchmarks.convert_memory --size tiny      # the golden tiny model: seconds

Writes a random upstream state dict of the chosen size once (cached like `benchmarks.run`'s
weights), then runs `python -m losatok_jax.convert` on it in a child process under
`/usr/bin/time -v` and reads its maximum resident set size. Users convert on 16 GB laptops and small
VMs: the goal is a peak of at most 1.5 times the checkpoint's size.
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
from pathlib import Path

from benchmarks.report import _cpu_model
from benchmarks.workloads import DEFAULT_CACHE_DIR, FULL_SIZES, TINY_SIZES, child_env, weights_file

GOAL = 1.5  # peak RSS over checkpoint size


def upstream_config(sizes: dict, path: Path) -> Path:
    """An upstream-format YAML for `sizes` (the tests' writer, so the converter reads it as users'
    files)."""
    from conftest import write_upstream_config

    return write_upstream_config(path, **{k: sizes[k] for k in (
        "embed_dim", "depth", "num_heads", "target_length", "decoder_dim", "decoder_embed_dim",
        "decoder_intermediate_size", "decoder_depth")})


def measure(pth: Path, config: Path, work: Path) -> dict:
    output = work / "converted"
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "losatok_jax.convert",
               "--config_path", str(config), "--model_path", str(pth), "--output_dir", str(output)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=child_env("cpu"))
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"conversion failed: {done.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    size = pth.stat().st_size
    written = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    shutil.rmtree(output)
    return {"checkpoint_gb": size / 1e9, "converted_gb": written / 1e9,
            "peak_rss_gb": peak_kb * 1024 / 1e9, "peak_over_checkpoint": peak_kb * 1024 / size,
            "seconds": seconds, "goal": GOAL, "met": peak_kb * 1024 <= GOAL * size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    sizes = FULL_SIZES if args.size == "full" else TINY_SIZES
    pth = weights_file(sizes, seed=0, cache_dir=args.cache_dir)
    with tempfile.TemporaryDirectory() as work:
        config = upstream_config(sizes, Path(work) / "config.yml")
        result = {"size": args.size, "machine": _cpu_model(), **measure(pth, config, Path(work))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
