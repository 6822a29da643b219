"""The README's code that users copy runs as written: the API, streaming decode, the Grain pipeline
over extracted latents."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf

from losatok_jax import extract

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_training_example_runs(golden_checkpoint, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((1.0, 2.0, 3.5, 4.0, 6.0)):  # shorter and longer than 64 tokens
        sf.write(folder / f"{i}.wav", 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
    assert extract.main(["--model_path", str(golden_checkpoint("tiny_chunk40")), "--input",
                         str(folder), "--output_dir", str(tmp_path / "latents"),
                         "--buckets", "32,64,128", "--num_workers", "2"]) == 0

    [block] = [b for b in python_blocks() if "latent_dataset(LATENT_DIR" in b]
    namespace = {"LATENT_DIR": str(tmp_path / "latents")}
    exec(compile(block, "<README.md training example>", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["batch"]["z"].shape == (4, namespace["TOKENS"], 16)
    assert namespace["batch"]["mask"].dtype == bool
    assert namespace["packed"]["segment_ids"].shape == (4, namespace["TOKENS"])
    assert namespace["generated"].shape == (namespace["TOKENS"], 16)


def test_python_api_example_runs(golden_checkpoint, tmp_path):
    """The API blocks, in order in one namespace: upstream's call on the tiny golden `.pth` and
    its config (on the CPU), then the rest on the converted golden checkpoint and the bundled
    speech file."""
    upstream, api = [b for b in python_blocks() if "load_losatok(" in b]
    golden = README.parent / "tests" / "data" / "golden" / "tiny_chunk40"
    shutil.copy(golden / "losatok.pth", tmp_path / "losatok.pth")
    speech = repr(str(README.parent / "examples" / "speech.wav"))
    upstream = (upstream.replace('"config/16k_16k_25Hz_losatok.yml"',
                                 repr(str(golden / "config.yml")))
                .replace('"ckpts/losatok_kl1e-3.pth"', repr(str(tmp_path / "losatok.pth")))
                .replace('device="cuda"', 'device="cpu"').replace('"example/en.wav"', speech))
    api = api.replace('"ckpts/losatok_kl1e-2"', repr(str(golden_checkpoint("tiny_chunk40"))))
    api = api.replace('"speech.flac"', speech)
    namespace = {}
    exec(compile(upstream, "<README.md upstream example>", "exec"), namespace)
    assert namespace["audio_recon"].shape == (1, 640 * namespace["features"]["z"].shape[1])
    exec(compile(api, "<README.md API example>", "exec"), namespace)
    tokens = namespace["features"]["z"].shape[1]
    assert namespace["recon"].shape == (1, 640 * tokens)
    assert [len(w) for w in namespace["waves"]] == [640 * len(f["z"])
                                                    for f in namespace["per_clip"]]


def test_streaming_example_runs(model):
    """The streaming block with a generator of uneven chunks and `play` collecting the audio:
    what it plays is `decode` of the whole sequence."""
    import losatok_jax

    [block] = [b for b in python_blocks() if "StreamingDecoder(" in b]
    z = np.random.default_rng(0).standard_normal((1, 30, 16)).astype(np.float32)
    played = []
    namespace = {"model": model, "play": played.append,
                 "generator": (z[:, a:b] for a, b in ((0, 1), (1, 8), (8, 8), (8, 30)))}
    exec(compile(block, "<README.md streaming example>", "exec"), namespace)
    np.testing.assert_allclose(np.concatenate(played, axis=1), losatok_jax.decode(model, z),
                               rtol=0, atol=1e-5)


def test_readme_performance_table_comes_from_a_results_file():
    """The README's performance table names the benchmark run it shows, whose results file
    exists and holds the table's rows (re-running the benchmark need not edit the README); the
    README shows some of them."""
    text = README.read_text()
    [name] = re.findall(r"python -m benchmarks\.run [^`]*--name (\S+?)`", text)
    results = json.loads((README.parent / "benchmarks" / "results" / f"{name}.json").read_text())
    table = {tuple(line.split(" | ")[:2]) for line in text.splitlines()
             if line.startswith(("| encode |", "| decode |", "| reconstruct |"))}
    assert table and table <= {(f"| {row['operation']}", row["input"]) for row in results["rows"]}
