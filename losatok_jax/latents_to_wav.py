"""Decode latents back to audio, from the shell: generated latents, or an extraction's records.

    python -m losatok_jax.latents_to_wav --model_path ckpts/losatok_kl1e-2 --input generated.npy \
        --output_dir wavs/ [--normalized latents/] [--ids a.wav,b.wav]

INPUT is a `.npy` of (T, D) or (B, T, D) latents, an `.npz` holding `z`, a folder of those
(searched recursively), or an extraction directory (its `z` records: every one, or `--ids`).
`--normalized DIR` first undoes `losatok_jax.data.normalize` with DIR's `stats.json`, for latents
a model generated in the normalised space. One 16 kHz float WAV per sequence, named after its file
(`name.wav`, or `name-<i>.wav` for each row of a batch) or its record id (`<id>.wav`, mirroring
the id's folders); the output folder may not be an input folder or lie inside one. `--model_path`
takes what `reconstruct` takes (a `.pth` is converted once). Every input is checked before
anything is written (a missing file, a wrong width, NaN or Inf, a wrong rank: one `error:` line,
status 2), and each WAV is written atomically, so nothing half-written is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from losatok_jax import _cli, _files, _model_source, audio_io, compilation, data
from losatok_jax._shards import npy_name
from losatok_jax.config import SAMPLE_RATE
from losatok_jax.errors import LosatokError, one_line, require

LATENT_SUFFIXES = (".npy", ".npz")


class LatentInputError(LosatokError):
    """Latents that cannot be decoded: the message names the file and why."""


class Latents(NamedTuple):
    name: str  # the output's path relative to --output_dir, without .wav
    source: str  # where it came from, for messages
    load: object  # () -> (T, D) float array


def _from_file(path: Path, stem: str) -> list[Latents]:
    """The sequences of one .npy/.npz, read memory-mapped (checked later, one at a time)."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as archive:
                if "z" not in archive.files:
                    raise LatentInputError(f"{path}: an .npz needs a `z` array; it has "
                                           f"{', '.join(archive.files) or 'none'}")
                shape = archive["z"].shape

            def array():
                with np.load(path) as archive:
                    return archive["z"]
        else:
            shape = np.load(path, mmap_mode="r").shape

            def array():
                return np.load(path, mmap_mode="r")
    except LatentInputError:
        raise
    except (OSError, ValueError) as e:
        raise LatentInputError(f"cannot read {path}: {one_line(e)}") from None
    if len(shape) == 2:
        return [Latents(stem, str(path), array)]
    if len(shape) == 3:
        return [Latents(f"{stem}-{i}", f"{path}[{i}]", lambda i=i: array()[i])
                for i in range(shape[0])]
    raise LatentInputError(f"{path}: latents must be shaped (T, D) or (B, T, D); got {shape}")


def _from_extraction(directory: Path, ids: list[str] | None) -> list[Latents]:
    if data.storage_format(directory) == "arrayrecord":
        require("grain", "data", "decoding an extraction's ArrayRecord shards")
        require("msgpack", "data", "decoding an extraction's ArrayRecord shards")
    try:
        source = data.LatentDataSource(directory)
    except FileNotFoundError as e:
        raise LatentInputError(str(e)) from None
    rows = data.read_index(directory)
    positions = {row["id"]: i for i, row in enumerate(rows)}
    wanted = ids if ids is not None else [row["id"] for row in rows]
    missing = [i for i in wanted if i not in positions]
    if missing:
        raise LatentInputError(f"{directory} has no record {missing[0]!r}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [Latents(npy_name(clip_id)[:-len(".npy")], f"{directory}:{clip_id}",
                     lambda i=positions[clip_id]: source[i]["z"]) for clip_id in wanted]


def list_sequences(source: str, ids: list[str] | None) -> list[Latents]:
    root = Path(source)
    if (root / data.INDEX_FILE).is_file():
        return _from_extraction(root, ids)
    if ids is not None:
        raise LatentInputError("--ids selects records of an extraction directory; "
                               f"{source} is not one")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in LATENT_SUFFIXES)
        if not files:
            raise LatentInputError(f"{source}: no .npy or .npz files in this folder")
        return [s for p in files
                for s in _from_file(p, str(p.relative_to(root).with_suffix("")))]
    if root.suffix.lower() in LATENT_SUFFIXES:
        if not root.exists():
            raise LatentInputError(f"{source}: no such file")
        return _from_file(root, root.stem)
    if not root.exists():
        raise LatentInputError(f"{source}: no such file or folder")
    raise LatentInputError(f"{source}: expected a .npy, an .npz, a folder of them or an "
                           "extraction directory")


def checked(sequence: Latents, width: int, stats) -> np.ndarray:
    """A sequence's latents as float32 (T, width), de-normalised when `stats` is given."""
    z = np.asarray(sequence.load())
    if z.ndim != 2 or z.shape[1] != width:
        raise LatentInputError(f"{sequence.source}: latents must be shaped (T, {width}); got "
                               f"{z.shape}")
    if not np.issubdtype(z.dtype, np.floating):
        raise LatentInputError(f"{sequence.source}: latents must be floating point; got {z.dtype}")
    if len(z) == 0:
        raise LatentInputError(f"{sequence.source}: holds no latent frames")
    z = z.astype(np.float32)
    if not np.isfinite(z).all():
        raise LatentInputError(f"{sequence.source}: contains NaN or Inf")
    return z if stats is None else (z * stats[1] + stats[0]).astype(np.float32)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _parser() -> argparse.ArgumentParser:
    parser = _cli.Parser("latents_to_wav", __doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help=_model_source.MODEL_HELP)
    parser.add_argument("--config_path", default=None, help=_model_source.CONFIG_HELP)
    parser.add_argument("--input", required=True,
                        help=".npy/.npz latents, a folder of them, or an extraction directory")
    parser.add_argument("--output_dir", required=True,
                        help="where the WAVs go (not inside an input folder)")
    parser.add_argument("--normalized", default=None, metavar="STATS_DIR",
                        help="the latents are normalised with STATS_DIR's stats.json: undo it")
    parser.add_argument("--ids", default=None,
                        help="comma-separated record ids of an extraction directory")
    parser.add_argument("--batch_size", type=_cli.positive(int, "whole number"), default=16,
                        help="sequences decoded at once")
    parser.add_argument("--compilation_cache_dir", default=None, metavar="DIR",
                        help="persistent JAX compilation cache")
    return parser


def _run(args: argparse.Namespace) -> None:
    from losatok_jax.api import decode, load_losatok

    # Inputs, then outputs (checked without creating anything), then the model.
    ids = None if args.ids is None else [i for i in args.ids.split(",") if i]
    sequences = list_sequences(args.input, ids)
    stats = None if args.normalized is None else data.normalization(args.normalized, "z")
    _model_source.check_exists(args.model_path)
    _files.check_apart(args.output_dir, "--output_dir",
                       [("--input", args.input), ("--normalized", args.normalized),
                        ("--model_path", args.model_path)])
    _files.check_writable_folder(args.output_dir)
    compilation.enable_compilation_cache(args.compilation_cache_dir)
    model_path, config_path = _model_source.resolve(args.model_path, args.config_path)
    model = load_losatok(model_path, config_path=config_path)
    width = model.config.decoder_dim
    if stats is not None and stats[0].shape != (width,):
        raise LatentInputError(f"{args.normalized}/stats.json holds {stats[0].shape[0]} "
                               f"channels; the model's latents have {width}")
    for sequence in sequences:  # everything is checked before anything is written
        checked(sequence, width, stats)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _files.OutputError(f"cannot create {out}: {e.strerror}") from None
    for group in _batches(sequences, args.batch_size):
        audio = decode(model, [checked(s, width, stats) for s in group])
        for sequence, samples in zip(group, audio):
            target = out / f"{sequence.name}.wav"
            target.parent.mkdir(parents=True, exist_ok=True)
            audio_io.save_audio(target, samples, SAMPLE_RATE)
    print(f"wrote {len(sequences)} WAV file(s) to {out}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 with one `error:` line on stderr)."""
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
