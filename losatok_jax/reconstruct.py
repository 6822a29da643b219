"""Reconstruct an audio file through LoSATok (encode to 25 Hz latents, decode), from the shell.

    python -m losatok_jax.reconstruct --input_path speech.flac --output_path recon.wav \
        --model_path ckpts/losatok_kl1e-2 [--save_features features.npz]

The flags are upstream's, so upstream's own command line works as written: `--model_path` may be
a converted checkpoint folder or upstream's `.pth` (converted once, into `<name>.orbax/` beside it;
no torch needed), `--device cuda` means the GPU, and `--save_features` writes `.npz`, or
`.pt` for torch users. Without --model_path the model is randomly initialised from
--config_path (the released config by default; a warning says so), as upstream does. The output
is a 16 kHz 32-bit float WAV, so its name must end in `.wav`; no output may be an input. Long files stream through fixed windows, so memory stays bounded whatever the
duration: only `z` is kept unless --save_features asks for all nine features; inputs over a
minute show a progress line.
--compilation_cache_dir (or $LOSATOK_COMPILATION_CACHE_DIR) keeps compiled programs on disk, so a
second run compiles nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from losatok_jax import _cli, _files, _model_source, _torch_format, audio_io, compilation
from losatok_jax._devices import PLATFORMS, select_platform
from losatok_jax.api import as_audio_batch, load_losatok, reconstruct
from losatok_jax.config import RELEASED_CONFIG, SAMPLE_RATE, ConfigError
from losatok_jax.model import COMPUTE_DTYPES, FEATURE_KEYS

FEATURE_FORMATS = (".npz", ".pt")
OUTPUT_FORMAT = ".wav"
# Inputs longer than this show a progress line while they are encoded and decoded.
PROGRESS_SECONDS = 60.0


def _parser() -> argparse.ArgumentParser:
    parser = _cli.Parser("reconstruct", __doc__.split("\n\n")[0])
    parser.add_argument("--input_path", required=True,
                        help="audio file (wav, flac, ogg, mp3, ...); any rate, any channels")
    parser.add_argument("--output_path", required=True,
                        help="reconstructed audio: a 16 kHz float WAV (the name must end in .wav)")
    parser.add_argument("--model_path", default=None,
                        help=f"{_model_source.MODEL_HELP}; default: random initialisation")
    parser.add_argument("--config_path", default=None, help=_model_source.CONFIG_HELP)
    parser.add_argument("--device", choices=tuple(PLATFORMS), default=None,
                        help="where to run (cuda and gpu both mean the GPU; default: JAX's "
                             "choice)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="compute dtype: float32 is the exact port; bfloat16 runs the "
                             "transformer and decoder matmuls in bf16 (fast on GPU and TPU)")
    parser.add_argument("--sample", action="store_true",
                        help="sample z = mu + eps * exp(logvar / 2) instead of using z = mu")
    parser.add_argument("--seed", type=_cli.seed, default=0,
                        help="seed for --sample noise and for random initialisation")
    parser.add_argument("--max_duration", type=_cli.positive(float, "number of seconds"),
                        default=None, help="use only the first S seconds of the input")
    parser.add_argument("--save_features", default=None, metavar="F.npz|F.pt",
                        help="also write the nine encoder features, each (1, T, dim): .npz "
                             "(numpy), or .pt (a dict of tensors for torch.load)")
    parser.add_argument("--compilation_cache_dir", default=None, metavar="DIR",
                        help="persistent JAX compilation cache (default: "
                             f"${compilation.CACHE_DIR_ENV} if set)")
    return parser


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output is a new or replaceable file that is no input, checked before slow work."""
    inputs = [("--input_path", args.input_path), ("--model_path", args.model_path),
              ("--config_path", args.config_path)]
    if Path(args.output_path).suffix.lower() != OUTPUT_FORMAT:
        raise _files.OutputError(f"--output_path {args.output_path}: the reconstruction is "
                                 f"written as a 16 kHz float WAV; give a name ending in .wav")
    _files.check_apart(args.output_path, "--output_path", inputs)
    _files.check_writable(args.output_path)
    if args.save_features is None:
        return
    if Path(args.save_features).suffix.lower() not in FEATURE_FORMATS:
        raise _files.OutputError(f"--save_features {args.save_features}: give a .npz or a .pt "
                                 "file name")
    _files.check_apart(args.save_features, "--save_features",
                       inputs + [("--output_path", args.output_path)])
    if Path(args.save_features).resolve() == Path(args.output_path).resolve():
        raise _files.OutputError("--save_features and --output_path name the same file")
    _files.check_writable(args.save_features)


def _save_features(path: str, features: dict[str, np.ndarray]) -> None:
    arrays = {key: np.asarray(value) for key, value in features.items()}
    with _files.atomic_write(path) as f:
        if Path(path).suffix.lower() == ".pt":
            _torch_format.save(f, arrays)  # what torch.load reads; torch is not needed here
        else:
            np.savez(f, **arrays)


class _Progress:
    """Encoding and decoding progress on a status line, for inputs long enough to need it."""

    def __init__(self, seconds: float):
        self.line = _cli.StatusLine() if seconds > PROGRESS_SECONDS else None
        self.seconds = seconds

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.line is not None:
            elapsed = time.perf_counter() - self.line.start
            self.line.show(f"{stage} {self.seconds / 60:.1f} min of audio: {done}/{total} "
                           f"batches, {elapsed:.0f} s")

    def end(self) -> None:
        if self.line is not None:
            self.line.end()


def _run(args: argparse.Namespace) -> None:
    if args.device is not None:
        select_platform(args.device)
    # Inputs first, then outputs (checked without writing), then the slow work.
    audio_io.check_readable(args.input_path)
    _model_source.check_exists(args.model_path)
    _check_outputs(args)
    cache_dir = compilation.enable_compilation_cache(args.compilation_cache_dir)
    counter = compilation.CompilationCounter()
    audio = audio_io.load_audio(args.input_path, SAMPLE_RATE, max_duration=args.max_duration)

    model_path, config_path = _model_source.resolve(args.model_path, args.config_path)
    if config_path is None and model_path is None:
        config_path = RELEASED_CONFIG
    model = load_losatok(model_path, config_path=config_path, seed=args.seed, dtype=args.dtype)
    if model.config.sample_rate != SAMPLE_RATE:
        raise ConfigError(f"the model expects {model.config.sample_rate} Hz audio; "
                          f"this tool reads and writes {SAMPLE_RATE} Hz")
    try:
        batch = as_audio_batch(audio, model.config)
    except ValueError as e:  # too short for the model's STFTs
        raise audio_io.AudioReadError(f"{args.input_path}: {e}") from None

    rng = jax.random.key(args.seed) if args.sample else None
    keys = FEATURE_KEYS if args.save_features is not None else ("z",)
    progress = _Progress(len(audio) / SAMPLE_RATE)
    recon, features = reconstruct(model, batch, sample=args.sample, rng=rng, features=keys,
                                  progress=progress)
    progress.end()
    for key in keys:
        print(f"{key}: {tuple(features[key].shape)}")

    audio_io.save_audio(args.output_path, np.asarray(recon[0]), SAMPLE_RATE)
    if args.save_features is not None:
        _save_features(args.save_features, features)
    print(f"wrote {args.output_path}")
    if cache_dir is not None:
        print(f"compilation cache {cache_dir}: {counter.loaded} programs loaded, "
              f"{counter.compiled} compiled")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
