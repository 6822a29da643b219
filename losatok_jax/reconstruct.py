"""Reconstruct an audio file through LoSATok (encode to 25 Hz latents, decode), from the shell.

    python -m losatok_jax.reconstruct --input_path speech.flac --output_path recon.wav \
        --model_path ckpts/losatok_kl1e-2 [--save_features features.npz]

Options follow upstream's `reconstruct.py`. Without --model_path the model is randomly
initialised from --config_path (a warning says so), as upstream does. The output is a 16 kHz
32-bit float WAV. Long files stream through fixed windows, so memory stays bounded whatever the
duration: only `z` is kept unless --save_features asks for all nine features (the 1280-wide ones
take about 1.4 GB per hour of audio). --compilation_cache_dir (or $LOSATOK_COMPILATION_CACHE_DIR)
keeps compiled programs on disk, so a second run compiles nothing. Bad input (a missing, damaged or too-short file, an unwritable output, a missing
checkpoint or config, an unavailable device) prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import types
import warnings
from pathlib import Path

import jax
import numpy as np

from losatok_jax import audio_io, compilation
from losatok_jax.config import ConfigError
from losatok_jax.model import (COMPUTE_DTYPES, FEATURE_KEYS, as_audio_batch, load_losatok,
                               reconstruct)

DEFAULT_CONFIG = "config/16k_16k_25Hz_losatok.yml"
SAMPLE_RATE = 16000
REPO_ROOT = Path(__file__).resolve().parent.parent


class DeviceError(ValueError):
    """The requested JAX platform cannot be used on this machine."""


def _resolve_config(path: str) -> str:
    """`path` as given if it exists; else relative to the repository, so any cwd works."""
    if not Path(path).exists() and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


def _select_device(platform: str) -> None:
    """Pins JAX to `platform`; must run before the first computation to take effect."""
    previous = jax.config.jax_platforms
    jax.config.update("jax_platforms", platform)
    try:
        jax.devices(platform)
    except RuntimeError as e:
        jax.config.update("jax_platforms", previous)  # leave an in-process caller's JAX usable
        # JAX's own advice (set JAX_PLATFORMS='') means "omit --device" here.
        reason = " ".join(str(e).split()).split(" (set JAX_PLATFORMS")[0]
        raise DeviceError(f"--device {platform} is not available ({reason}); omit --device to "
                          "let JAX choose") from None


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m losatok_jax.reconstruct",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True,
                        help="audio file (wav, flac, ogg, mp3, ...); any rate, any channels")
    parser.add_argument("--output_path", required=True, help="reconstructed 16 kHz WAV to write")
    parser.add_argument("--model_path", default=None,
                        help="converted checkpoint directory (convert/torch_to_orbax.py); "
                             "default: random initialisation")
    parser.add_argument("--config_path", default=None,
                        help=f"upstream YAML config (default: {DEFAULT_CONFIG}); with "
                             "--model_path it is optional and must match the checkpoint's")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None,
                        help="JAX platform to run on (default: JAX's choice)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="compute dtype: float32 is the exact port; bfloat16 runs the "
                             "transformer and decoder matmuls in bf16 (fast on GPU and TPU)")
    parser.add_argument("--sample", action="store_true",
                        help="sample z = mu + eps * exp(logvar / 2) instead of using z = mu")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for --sample noise and for random initialisation")
    parser.add_argument("--max_duration", type=_positive_seconds, default=None,
                        help="use only the first S seconds of the input")
    parser.add_argument("--save_features", default=None, metavar="F.npz",
                        help="also write the nine encoder features, each (1, T, dim), to F.npz")
    parser.add_argument("--compilation_cache_dir", default=None, metavar="DIR",
                        help="persistent JAX compilation cache (default: "
                             f"${compilation.CACHE_DIR_ENV} if set)")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.device is not None:
        _select_device(args.device)
    cache_dir = compilation.enable_compilation_cache(args.compilation_cache_dir)
    counter = compilation.CompilationCounter()
    # Fail on unwritable outputs before the slow model load.
    audio_io.check_writable(args.output_path)
    if args.save_features is not None:
        audio_io.check_writable(args.save_features)
    audio = audio_io.load_audio(args.input_path, SAMPLE_RATE, max_duration=args.max_duration)

    config_path = args.config_path
    if config_path is None and args.model_path is None:
        config_path = DEFAULT_CONFIG
    if config_path is not None:
        config_path = _resolve_config(config_path)
    model = load_losatok(args.model_path, config_path=config_path, seed=args.seed,
                         dtype=args.dtype)
    if model.config.sample_rate != SAMPLE_RATE:
        raise ConfigError(f"the model expects {model.config.sample_rate} Hz audio; "
                          f"this tool reads and writes {SAMPLE_RATE} Hz")
    try:
        batch = as_audio_batch(audio, model.config)
    except ValueError as e:  # too short for the model's STFTs
        raise audio_io.AudioReadError(f"{args.input_path}: {e}") from None

    rng = jax.random.key(args.seed) if args.sample else None
    keys = FEATURE_KEYS if args.save_features is not None else ("z",)
    recon, features = reconstruct(model, batch, sample=args.sample, rng=rng, features=keys)
    for key in keys:
        print(f"{key}: {tuple(features[key].shape)}")

    audio_io.save_audio(args.output_path, np.asarray(recon[0]), SAMPLE_RATE)
    if args.save_features is not None:
        with audio_io.atomic_write(args.save_features) as f:
            np.savez(f, **{key: np.asarray(features[key]) for key in FEATURE_KEYS})
    print(f"wrote {args.output_path}")
    if cache_dir is not None:
        print(f"compilation cache {cache_dir}: {counter.loaded} programs loaded, "
              f"{counter.compiled} compiled")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    args = _parser().parse_args(argv)
    from losatok_jax.checkpoint import CheckpointError  # Orbax import is slow; after arg checks

    with warnings.catch_warnings():
        warnings.showwarning = _print_warning  # one line per warning, like the errors
        try:
            _run(args)
        except (audio_io.AudioReadError, audio_io.AudioWriteError, ConfigError, CheckpointError,
                DeviceError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module rebinds `losatok_jax.reconstruct` from the API function to the
    module; forwarding calls keeps `losatok_jax.reconstruct(model, audio)` working either way."""

    def __call__(self, *args, **kwargs):
        return reconstruct(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
