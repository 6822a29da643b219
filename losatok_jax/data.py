"""Latents on disk, and what trains on them: records, a Grain data source, normalisation with an
extraction's statistics, and `latent_dataset` (crop/pad or packed batches).

A record is one clip: a msgpack map

    {"id": str, "path": str, "num_tokens": int, "duration": float (seconds),
     "sample_rate": int (the rate the features were computed at),
     "features": {name: {"dtype": "float32" | "bfloat16" | "float16",
                         "shape": [T, dim], "data": raw bytes, C order, little-endian}}}

stored in ArrayRecord shards `latents-PPPPP-SSSSS.array_record` (process, shard), or, extracted
with `--format npy`, one `<id>.npy` per clip. Raw buffers keep records light and decoding a single
`np.frombuffer` per feature; msgpack keeps them readable from any language.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from losatok_jax.errors import LosatokError
from losatok_jax.stats import load_stats

SHARD_GLOB = "latents-*.array_record"
INDEX_FILE = "index.jsonl"
SETTINGS_FILE = "extraction.json"
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float16": np.dtype(np.float16)}


def encode_record(*, id: str, path: str, duration: float, sample_rate: int,
                  features: dict[str, np.ndarray], dtype: str = "float32") -> bytes:
    """Serialises one clip's features (each (T, dim)), cast to the storage `dtype`."""
    import msgpack  # the `data` extra, like ArrayRecord: `.npy` latents need neither

    storage = STORAGE_DTYPES[dtype]
    packed = {}
    for name, array in features.items():
        array = np.ascontiguousarray(np.asarray(array).astype(storage, copy=False))
        packed[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data": memoryview(array.reshape(-1).view(np.uint8))}  # no copy
    num_tokens = next(iter(features.values())).shape[0]
    return msgpack.packb({"id": id, "path": path, "num_tokens": int(num_tokens),
                          "duration": float(duration), "sample_rate": int(sample_rate),
                          "features": packed})


def decode_record(record: bytes) -> dict[str, Any]:
    """One record -> {"id", "path", "num_tokens", "duration", "sample_rate", <feature>: array}."""
    import msgpack

    raw = msgpack.unpackb(record)
    out = {key: raw[key] for key in ("id", "path", "num_tokens", "duration", "sample_rate")}
    for name, packed in raw["features"].items():
        out[name] = np.frombuffer(packed["data"], STORAGE_DTYPES[packed["dtype"]]).reshape(
            packed["shape"])
    return out


def complete_shards(directory: str | os.PathLike) -> list[Path]:
    """Complete shards in a stable order: those whose index was written (`_shards`)."""
    return sorted(p for p in Path(directory).glob(SHARD_GLOB)
                  if p.with_name(p.name.replace(".array_record", ".index.jsonl")).exists())


def read_index(directory: str | os.PathLike) -> list[dict]:
    """The rows of an extraction's index.jsonl, in storage order."""
    path = Path(directory) / INDEX_FILE
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise FileNotFoundError(f"{path}: {e.strerror}; is {directory} an extraction "
                                "directory?") from None


def storage_format(directory: str | os.PathLike) -> str:
    settings = Path(directory) / SETTINGS_FILE
    return json.loads(settings.read_text()).get("format", "arrayrecord") if settings.exists() \
        else "arrayrecord"


class LatentDataSource:
    """Random access over every record of an extraction directory, ArrayRecord or npy (Grain's
    data-source protocol: `len` and `__getitem__`), as dicts: id, path, num_tokens, duration,
    sample_rate and each stored feature as a numpy array (T, dim)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.format = storage_format(directory)
        if self.format == "npy":
            self._rows = read_index(directory)
            if not self._rows:
                raise FileNotFoundError(f"no records in {directory}")
            self._feature = json.loads((self.directory / SETTINGS_FILE).read_text())[
                "features"][0]
            return
        from grain.python import ArrayRecordDataSource

        self._shards = complete_shards(directory)
        if not self._shards:
            raise FileNotFoundError(f"no {SHARD_GLOB} shards in {directory}")
        self._source = ArrayRecordDataSource([str(p) for p in self._shards])

    def __len__(self) -> int:
        return len(self._rows) if self.format == "npy" else len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.format == "npy":
            row = self._rows[index]
            keys = ("id", "path", "num_tokens", "duration", "sample_rate")
            return {**{k: row[k] for k in keys},
                    self._feature: np.load(self.directory / row["file"])}
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"LatentDataSource({self.directory}, {self.format}, {len(self)} records)"


def normalization(directory: str | os.PathLike, feature: str = "z") -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """(mean, scale) per channel from an extraction's stats.json: scale is the std, or 1 for a
    channel that never varies (it is only centred)."""
    mean, std = load_stats(directory, feature)
    return mean, np.where(std > 0, std, 1.0).astype(np.float32)


def normalize(x, directory: str | os.PathLike, feature: str = "z") -> np.ndarray:
    """(x - mean) / std with the per-channel statistics of an extraction (`stats.json`)."""
    mean, scale = normalization(directory, feature)
    return ((np.asarray(x, np.float32) - mean) / scale).astype(np.float32)


def denormalize(x, directory: str | os.PathLike, feature: str = "z") -> np.ndarray:
    """The inverse of `normalize`: generated latents back to the model's scale, for `decode`."""
    mean, scale = normalization(directory, feature)
    return (np.asarray(x, np.float32) * scale + mean).astype(np.float32)


def latent_dataset(directory: str | os.PathLike, *, tokens: int, batch_size: int, seed: int = 0,
                   feature: str = "z", normalize: bool = True, pack: bool = False,
                   shuffle: bool = True, num_epochs: int = 1, drop_remainder: bool = True,
                   shard_options=None, num_packing_bins: int | None = None):
    """Training batches of latents from an extraction directory, as a Grain dataset.

    - `pack=False` (DiT-style): one row per record per epoch, `{feature: (B, tokens, D) float32,
      "mask": (B, tokens) bool}`: a random contiguous crop of a longer record (a new offset each
      epoch), or the whole record left-aligned and zero-padded; `mask` marks real tokens.
    - `pack=True` (sequence models): records are cut into pieces of at most `tokens` and packed
      first-fit (Grain's `FirstFitPackIterDataset`) into rows of exactly `tokens`:
      `{feature, "segment_ids": (B, tokens) int32 (0 = padding, 1, 2, ... per piece in a row),
      "positions": (B, tokens) int32 (index within the piece)}`. Every token of every record is
      in exactly one row per epoch.
    `normalize` applies `(x - mean) / std` from `stats.json` (`denormalize` inverts it). Records
    are shuffled anew each epoch (`shuffle`, seeded). `drop_remainder` drops a last partial
    batch. `num_packing_bins` (default max(64, batch_size)) rows fill at once: more bins, less
    padding (docs/performance.md, "Latent loading"). Multi-host: `shard_options` (default
    `grain.sharding.ShardByJaxProcess()`) gives each process every `shard_count`-th record from
    `shard_index` on, disjoint across processes.
    """
    import grain

    if tokens < 1 or batch_size < 1 or num_epochs < 1:
        raise LosatokError("tokens, batch_size and num_epochs must be positive")
    source = LatentDataSource(directory)
    mean, scale = normalization(directory, feature) if normalize else (0.0, 1.0)
    options = shard_options or grain.sharding.ShardByJaxProcess()
    dataset = grain.MapDataset.source(source)[options.shard_index::options.shard_count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)

    def scaled(z):  # only the tokens that are used are converted and normalised
        return ((np.asarray(z, np.float32) - mean) / scale).astype(np.float32)

    dataset = dataset.map(lambda record: record[feature])
    if not pack:
        dataset = dataset.random_map(functools.partial(_crop_or_pad, tokens=tokens,
                                                       feature=feature, scaled=scaled),
                                     seed=seed + 1)
        return dataset.batch(batch_size, drop_remainder=drop_remainder)
    longest = max(row["num_tokens"] for row in read_index(directory))
    pieces = grain.experimental.FlatMapIterDataset(
        dataset.to_iter_dataset(), _Pieces(tokens, -(-longest // tokens), feature, scaled))
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={feature: tokens},
        num_packing_bins=num_packing_bins or max(64, batch_size),
        seed=seed, shuffle_bins=shuffle)
    packed = packed.map(functools.partial(_rename_packing_keys, feature=feature))
    return packed.batch(batch_size, drop_remainder=drop_remainder)


def _crop_or_pad(z: np.ndarray, rng: np.random.Generator, *, tokens: int, feature: str,
                 scaled) -> dict:
    if len(z) >= tokens:
        start = rng.integers(0, len(z) - tokens + 1)
        return {feature: scaled(z[start:start + tokens]), "mask": np.ones(tokens, bool)}
    padded = np.zeros((tokens, z.shape[1]), np.float32)
    padded[:len(z)] = scaled(z)
    return {feature: padded, "mask": np.arange(tokens) < len(z)}


class _Pieces:
    """A record's latents cut into consecutive pieces of at most `tokens` (Grain's FlatMap)."""

    def __init__(self, tokens: int, max_fan_out: int, feature: str, scaled):
        self.tokens, self.max_fan_out, self.feature = tokens, max_fan_out, feature
        self.scaled = scaled

    def flat_map(self, z: np.ndarray) -> list[dict]:
        z = self.scaled(z)
        return [{self.feature: z[start:start + self.tokens]}
                for start in range(0, len(z), self.tokens)]


def _rename_packing_keys(row: dict, *, feature: str) -> dict:
    return {feature: row[feature], "segment_ids": row[f"{feature}_segment_ids"],
            "positions": row[f"{feature}_positions"]}
