"""bfloat16 accuracy against float32, and the start-up time of the reconstruct CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.frameworks import load_jax_model
from benchmarks.workloads import REPO_ROOT, SAMPLE_RATE, child_env, make_config
from signals import (log_spectral_distance, music_signal, noise_signal, speech_signal,
                     token_cosines)

# --------------------------------------------------------------------------------------------
# bfloat16 accuracy
# --------------------------------------------------------------------------------------------

def bf16_accuracy(model32, signals: dict[str, np.ndarray]) -> dict:
    """bfloat16 against float32 on each signal: z cosine per token and relative error, the same for
    semantic_emb, and the log-spectral distance of the decoded audio."""
    import losatok_jax

    model16 = model32.astype("bfloat16")
    results = {}
    for name, audio in signals.items():
        f32 = losatok_jax.encode(model32, audio[None], features=("z", "semantic_emb"))
        f16 = losatok_jax.encode(model16, audio[None], features=("z", "semantic_emb"))
        cos = token_cosines(f32["z"], f16["z"])
        audio32 = losatok_jax.api.decode(model32, f32["z"])[0]
        audio16 = losatok_jax.api.decode(model16, f16["z"])[0]
        decoder_only = losatok_jax.api.decode(model16, f32["z"])[0]
        results[name] = {
            "seconds": len(audio) / SAMPLE_RATE,
            "z_cosine_min": float(cos.min()), "z_cosine_mean": float(cos.mean()),
            "z_relative_error": float(np.linalg.norm(f16["z"] - f32["z"])
                                      / np.linalg.norm(f32["z"])),
            "semantic_emb_cosine_min": float(token_cosines(f32["semantic_emb"],
                                                           f16["semantic_emb"]).min()),
            "audio_lsd_db": log_spectral_distance(audio32, audio16),
            "decoder_only_lsd_db": log_spectral_distance(audio32, decoder_only),
            "audio_relative_error": float(np.linalg.norm(audio16 - audio32)
                                          / np.linalg.norm(audio32)),
        }
        print(f"  bf16 vs f32 {name:7s} z cos min {results[name]['z_cosine_min']:.6f}  "
              f"rel {results[name]['z_relative_error']:.2e}  "
              f"LSD {results[name]['audio_lsd_db']:.3f} dB", flush=True)
    return results


def accuracy_worker(spec: dict) -> dict:
    config = make_config(spec["sizes"])
    model = load_jax_model(Path(spec["weights"]), config, "float32")
    signals = {"speech": speech_signal(), "music": music_signal(), "noise": noise_signal()}
    return {"weights": "random (no real checkpoint available)",
            "signals": bf16_accuracy(model, signals)}


# --------------------------------------------------------------------------------------------
# Start-up: converted checkpoint on disk -> first reconstructed 10 s file, through the CLI
# --------------------------------------------------------------------------------------------

def checkpoint_worker(spec: dict) -> dict:
    from losatok_jax import checkpoint

    path = Path(spec["checkpoint"])
    if (path / checkpoint.CONFIG_FILE).exists():
        stale = checkpoint.mismatch(path)  # written by an earlier version: convert anew
        if stale is None:
            return {"checkpoint": str(path)}
        print(f"  {stale}", flush=True)
        shutil.rmtree(path)
    model = load_jax_model(Path(spec["weights"]), make_config(spec["sizes"]), "float32")
    checkpoint.save(path, model)
    return {"checkpoint": str(path)}


def startup(spec: dict, cache_dir: Path, run_worker: Callable[[str, dict], dict]) -> dict:
    """Wall time of `python -m losatok_jax.reconstruct` on a 10 s file: with an empty compilation
    cache (cold), then with the one the first run filled (warm). `run_worker` runs the checkpoint
    worker that converts the weights first."""
    from losatok_jax import audio_io

    checkpoint = cache_dir / f"ckpt-{Path(spec['weights']).stem}"
    run_worker("checkpoint", {**spec, "checkpoint": str(checkpoint)})
    wav = cache_dir / "startup-10s.wav"
    speech = speech_signal()
    audio = np.concatenate([speech, music_signal(10.0 - len(speech) / SAMPLE_RATE)])
    audio_io.save_audio(wav, audio[:10 * SAMPLE_RATE])
    results = {}
    with tempfile.TemporaryDirectory(prefix="losatok-startup-") as tmp:
        command = [sys.executable, "-m", "losatok_jax.reconstruct", "--input_path", str(wav),
                   "--output_path", str(Path(tmp) / "recon.wav"), "--model_path",
                   str(checkpoint), "--compilation_cache_dir", str(Path(tmp) / "cache")]
        for run in ("cold_cache", "warm_cache"):
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(spec["device"]),
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"reconstruct CLI failed: {done.stderr[-2000:]}")
            summary = [line for line in done.stdout.splitlines() if "compilation cache" in line]
            results[run] = {"seconds": seconds, "cache": summary[-1] if summary else ""}
            print(f"  start-up ({run}): {seconds:.1f} s  {results[run]['cache']}", flush=True)
    results["checkpoint_gb"] = sum(f.stat().st_size for f in checkpoint.rglob("*")
                                   if f.is_file()) / 2**30
    results["upstream"] = ("not runnable here (no network): upstream's AudioVAE constructor "
                           "downloads MiDashengLM-7B from Hugging Face (a ~7B-parameter "
                           "checkpoint, ~15 GB at 16 bits) and loads it to keep its audio encoder")
    return results
