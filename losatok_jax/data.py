"""Latent records on disk, and a Grain data source to train on them.

A record is one clip: a msgpack map

    {"id": str, "path": str, "num_tokens": int, "duration": float (seconds),
     "sample_rate": int (the rate the features were computed at),
     "features": {name: {"dtype": "float32" | "bfloat16" | "float16",
                         "shape": [T, dim], "data": raw bytes, C order, little-endian}}}

stored in ArrayRecord shards `latents-PPPPP-SSSSS.array_record` (process, shard). Raw buffers keep
records light and decoding a single `np.frombuffer` per feature; msgpack keeps them readable
from any language.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

SHARD_GLOB = "latents-*.array_record"
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float16": np.dtype(np.float16)}


def encode_record(*, id: str, path: str, duration: float, sample_rate: int,
                  features: dict[str, np.ndarray], dtype: str = "float32") -> bytes:
    """Serialises one clip's features (each (T, dim)), cast to the storage `dtype`."""
    storage = STORAGE_DTYPES[dtype]
    packed = {}
    for name, array in features.items():
        array = np.ascontiguousarray(np.asarray(array).astype(storage))
        packed[name] = {"dtype": dtype, "shape": list(array.shape), "data": array.tobytes()}
    num_tokens = next(iter(features.values())).shape[0]
    return msgpack.packb({"id": id, "path": path, "num_tokens": int(num_tokens),
                          "duration": float(duration), "sample_rate": int(sample_rate),
                          "features": packed})


def decode_record(record: bytes) -> dict[str, Any]:
    """One record -> {"id", "path", "num_tokens", "duration", "sample_rate", <feature>: array}."""
    raw = msgpack.unpackb(record)
    out = {key: raw[key] for key in ("id", "path", "num_tokens", "duration", "sample_rate")}
    for name, packed in raw["features"].items():
        out[name] = np.frombuffer(packed["data"], STORAGE_DTYPES[packed["dtype"]]).reshape(
            packed["shape"])
    return out


def complete_shards(directory: str | os.PathLike) -> list[Path]:
    """Finished shards in a stable order (unfinished ones carry a `.tmp` suffix and are skipped)."""
    return sorted(Path(directory).glob(SHARD_GLOB))


class LatentDataSource:
    """Random access over every record of an extraction directory (Grain's data-source protocol:
    `len` and `__getitem__`), decoding records to dicts of numpy arrays."""

    def __init__(self, directory: str | os.PathLike):
        from grain.python import ArrayRecordDataSource

        self._shards = complete_shards(directory)
        if not self._shards:
            raise FileNotFoundError(f"no {SHARD_GLOB} shards in {directory}")
        self._source = ArrayRecordDataSource([str(p) for p in self._shards])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"LatentDataSource({len(self._shards)} shards, {len(self)} records)"
