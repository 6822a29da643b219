"""Reconstruct an audio file through LoSATok (encode to 25 Hz latents, decode), from the shell.

    python -m losatok_jax.reconstruct --input_path speech.flac --output_path recon.wav \
        --model_path ckpts/losatok_kl1e-2 [--save_features features.npz]

The flags are upstream's, so upstream's own command line works as written: `--model_path` may be
a converted checkpoint folder or upstream's `.pth` (converted once, into `<name>.orbax/` beside it;
no torch needed), `--device cuda` means the GPU, and `--save_features` writes `.npz`, or
`.pt` for torch users. Without --model_path the model is randomly initialised from --config_path
(the released config by default; a warning says so), as upstream does. The output is a 16 kHz
32-bit float WAV. Long files stream through fixed windows, so memory stays bounded whatever the
duration: only `z` is kept unless --save_features asks for all nine features.
--compilation_cache_dir (or $LOSATOK_COMPILATION_CACHE_DIR) keeps compiled programs on disk, so a
second run compiles nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import jax
import numpy as np

from losatok_jax import _cli, _torch_format, audio_io, compilation
from losatok_jax.api import as_audio_batch, load_losatok, reconstruct
from losatok_jax.config import RELEASED_CONFIG, SAMPLE_RATE, ConfigError
from losatok_jax.errors import LosatokError
from losatok_jax.model import COMPUTE_DTYPES, FEATURE_KEYS

# --device values, upstream's spelling ("cuda") included, and the JAX platform each means.
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
FEATURE_FORMATS = (".npz", ".pt")
CONVERTED_SUFFIX = ".orbax"
SOURCE_FILE = "converted_from.json"


class DeviceError(LosatokError):
    """The requested JAX platform cannot be used on this machine."""


def select_device(name: str) -> None:
    """Pins JAX to the platform `--device name` means; must run before the first computation."""
    platform = PLATFORMS[name]
    previous = jax.config.jax_platforms
    jax.config.update("jax_platforms", platform)
    try:
        jax.devices(platform)
    except RuntimeError as e:
        jax.config.update("jax_platforms", previous)  # leave an in-process caller's JAX usable
        # JAX's own advice (set JAX_PLATFORMS='') means "omit --device" here.
        reason = " ".join(str(e).split()).split(" (set JAX_PLATFORMS")[0]
        raise DeviceError(f"--device {name} is not available ({reason}); omit --device to "
                          "let JAX choose") from None


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
                        help="converted checkpoint folder, or upstream's .pth (converted once "
                             "beside it); default: random initialisation")
    parser.add_argument("--config_path", default=None,
                        help=f"upstream YAML config (default: the released {RELEASED_CONFIG}, "
                             "shipped with the package); with a converted checkpoint it is "
                             "optional and must match the checkpoint's")
    parser.add_argument("--device", choices=tuple(PLATFORMS), default=None,
                        help="where to run (cuda and gpu both mean the GPU; default: JAX's "
                             "choice)")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="compute dtype: float32 is the exact port; bfloat16 runs the "
                             "transformer and decoder matmuls in bf16 (fast on GPU and TPU)")
    parser.add_argument("--sample", action="store_true",
                        help="sample z = mu + eps * exp(logvar / 2) instead of using z = mu")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for --sample noise and for random initialisation")
    parser.add_argument("--max_duration", type=_positive_seconds, default=None,
                        help="use only the first S seconds of the input")
    parser.add_argument("--save_features", default=None, metavar="F.npz|F.pt",
                        help="also write the nine encoder features, each (1, T, dim): .npz "
                             "(numpy), or .pt (a dict of tensors for torch.load)")
    parser.add_argument("--compilation_cache_dir", default=None, metavar="DIR",
                        help="persistent JAX compilation cache (default: "
                             f"${compilation.CACHE_DIR_ENV} if set)")
    return parser


def _check_features_path(path: str) -> None:
    if Path(path).suffix.lower() not in FEATURE_FORMATS:
        raise audio_io.AudioWriteError(f"cannot write {path}: --save_features takes a .npz or a "
                                       ".pt file name")
    audio_io.check_writable(path)


def _save_features(path: str, features: dict[str, np.ndarray]) -> None:
    arrays = {key: np.asarray(value) for key, value in features.items()}
    with audio_io.atomic_write(path) as f:
        if Path(path).suffix.lower() == ".pt":
            _torch_format.save(f, arrays)  # what torch.load reads; torch is not needed here
        else:
            np.savez(f, **arrays)


def _source_stamp(pth: Path) -> dict:
    stat = pth.stat()
    return {"path": str(pth.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_checkpoint(pth: Path, config_path: str | None) -> Path:
    """The converted checkpoint folder for upstream checkpoint `pth`: `<name>.orbax/` beside it
    (or, where that folder cannot be written, in the user's cache), converted on first use.
    A folder converted from another file (or an older version of this one) is never reused or
    overwritten: the error says what to do."""
    if not pth.is_file():
        raise LosatokError(f"--model_path {pth}: no such file")
    stamp = dict(_source_stamp(pth), config=str(config_path or RELEASED_CONFIG))
    beside = pth.with_name(pth.name.removesuffix(pth.suffix) + CONVERTED_SUFFIX)
    digest = hashlib.sha256(stamp["path"].encode()).hexdigest()[:12]
    cached = Path.home() / ".cache" / "losatok_jax" / f"{beside.name}-{digest}"
    for folder in (beside, cached):
        if (folder / SOURCE_FILE).is_file():
            if json.loads((folder / SOURCE_FILE).read_text()) == stamp:
                return folder
            raise LosatokError(f"{folder} was converted from another version of {pth} (or with "
                               "another config); remove it to convert again")
    from losatok_jax import convert

    folder = beside if _can_create(beside) else cached
    convert.convert(config_path or RELEASED_CONFIG, pth, folder)
    (folder / SOURCE_FILE).write_text(json.dumps(stamp) + "\n")
    print(f"converted {pth} into {folder}; later runs reuse it")
    return folder


def _can_create(folder: Path) -> bool:
    """Whether `folder` is new and its parent writable (a conversion there would succeed)."""
    if folder.exists():
        return False
    try:
        audio_io.check_writable(folder)
    except audio_io.AudioWriteError:
        return False
    return True


def _run(args: argparse.Namespace) -> None:
    if args.device is not None:
        select_device(args.device)
    cache_dir = compilation.enable_compilation_cache(args.compilation_cache_dir)
    counter = compilation.CompilationCounter()
    # Fail on unwritable outputs before the slow model load.
    audio_io.check_writable(args.output_path)
    if args.save_features is not None:
        _check_features_path(args.save_features)
    audio = audio_io.load_audio(args.input_path, SAMPLE_RATE, max_duration=args.max_duration)

    model_path, config_path = args.model_path, args.config_path
    if model_path is not None and Path(model_path).suffix.lower() in (".pth", ".pt", ".bin"):
        model_path = converted_checkpoint(Path(model_path), config_path)
        config_path = None  # the conversion checked the checkpoint against it
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
    recon, features = reconstruct(model, batch, sample=args.sample, rng=rng, features=keys)
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
