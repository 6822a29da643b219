"""The README's code that users copy: the Grain pipeline over extracted latents runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf

from losatok_jax import extract

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_grain_pipeline_example_runs(golden_checkpoint, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((1.0, 2.0, 3.5, 4.0, 6.0)):  # shorter and longer than 64 tokens
        sf.write(folder / f"{i}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
    assert extract.main(["--model_path", str(golden_checkpoint("tiny_chunk40")), "--input",
                         str(folder), "--output_dir", str(tmp_path / "latents"),
                         "--buckets", "32,64,128", "--num_workers", "2"]) == 0

    [block] = [b for b in python_blocks() if "LatentDataSource(LATENT_DIR)" in b]
    namespace = {"LATENT_DIR": str(tmp_path / "latents")}
    exec(compile(block, "<README.md grain example>", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["batch"]["z"].shape == (4, namespace["TOKENS"], 16)
    assert namespace["batch"]["mask"].dtype == bool


def test_readme_shows_the_latest_cpu_table():
    """The README's performance table is the one `benchmarks.run` last wrote, row for row."""
    results = README.parent / "benchmarks" / "results" / "cpu.md"
    rows = []
    for line in results.read_text().splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert len(rows) > 2 and "\n".join(rows) in README.read_text()
