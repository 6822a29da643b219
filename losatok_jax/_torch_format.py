"""PyTorch's checkpoint format, read and written without PyTorch.

A `torch.save` file is a zip archive: `<name>/data.pkl`, a pickle whose tensors refer to raw
storages `<name>/data/<key>` (stored uncompressed), plus small version records. Reading runs that
pickle with an allow-list (tensors, their storages, `OrderedDict`; nothing else can be built, so a
checkpoint cannot run code) and maps every tensor onto the file with `mmap`: nothing is read until
used, and `release` gives the pages of a tensor back once it has been copied. Writing produces the
same layout for a dict of arrays, so `torch.load` reads it. The runtime package never imports
torch; this module is how it meets torch's files.
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from losatok_jax.errors import LosatokError

# torch's storage classes (as pickled by name) <-> numpy dtypes.
TORCH_STORAGE_TYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {dtype: name for name, dtype in TORCH_STORAGE_TYPES.items()}


class TorchFormatError(ValueError):
    """A file that is not a PyTorch checkpoint this module can read safely."""


class MappedTensor:
    """One tensor of a checkpoint: its shape and dtype, and its values on demand (`numpy()`)."""

    def __init__(self, archive: "Checkpoint", entry: str, dtype: np.dtype, offset: int,
                 shape: tuple[int, ...], stride: tuple[int, ...]):
        self.archive, self.entry, self.dtype = archive, entry, dtype
        self.offset, self.shape, self.stride = offset, tuple(shape), tuple(stride)

    def numpy(self) -> np.ndarray:
        """A read-only view of the values in the mapped file."""
        start = self.archive.data_start(self.entry) + self.offset * self.dtype.itemsize
        return np.ndarray(self.shape, self.dtype, buffer=self.archive.mapped, offset=start,
                          strides=tuple(s * self.dtype.itemsize for s in self.stride))

    def release(self) -> None:
        """Drops the resident pages of this tensor's storage (they are re-read if used again)."""
        start = self.archive.data_start(self.entry)
        end = start + self.archive.zip.getinfo(self.entry).file_size
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self.archive.mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


class Checkpoint:
    """An open `torch.save` zip file; `load()` gives its object with `MappedTensor` leaves."""

    def __init__(self, path: str | os.PathLike):
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise TorchFormatError("no zip directory: cut short, or saved by torch < 1.6 (load "
                                   "and save it again with a current torch)") from None
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFormatError("no data.pkl in the archive")
        self.prefix = pickles[0][:-len("data.pkl")]
        with open(path, "rb") as f:
            self.mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._starts: dict[str, int] = {}

    def data_start(self, entry: str) -> int:
        """Where an uncompressed entry's bytes start in the file (after its local header)."""
        if entry not in self._starts:
            info = self.zip.getinfo(entry)
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchFormatError(f"{entry} is compressed; torch stores tensors uncompressed")
            name_length, extra_length = struct.unpack(
                "<HH", self.mapped[info.header_offset + 26:info.header_offset + 30])
            self._starts[entry] = info.header_offset + 30 + name_length + extra_length
        return self._starts[entry]

    def load(self):
        return _Unpickler(io.BytesIO(self.zip.read(self.prefix + "data.pkl")), self).load()


class _Unpickler(pickle.Unpickler):
    """Builds only what checkpoints are made of."""

    def __init__(self, file, archive: Checkpoint):
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in TORCH_STORAGE_TYPES:
            return TORCH_STORAGE_TYPES[name]
        raise TorchFormatError(f"unexpected object {module}.{name} in the checkpoint")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], np.dtype)):
            raise TorchFormatError(f"unexpected storage reference {pid!r} in the checkpoint")
        return self.archive, f"{self.archive.prefix}data/{pid[2]}", pid[1]


def _rebuild_tensor(storage, offset, shape, stride, requires_grad=False, hooks=None, *extra):
    archive, entry, dtype = storage
    return MappedTensor(archive, entry, dtype, offset, shape, stride)


def save(file, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` (name -> array) as `torch.save` writes a dict of tensors, to `file` (a path
    or a binary file); `torch.load` gives back a dict of tensors."""
    pickled = bytearray(b"\x80\x02}(")  # protocol 2, an empty dict, a mark for its items
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for key, (name, array) in enumerate(arrays.items()):
            array = np.ascontiguousarray(array)
            if array.dtype not in _STORAGE_NAMES:
                raise LosatokError(f"{name}: torch has no storage for {array.dtype}")
            pickled += _item(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
            pickled += (b"(" + _item("storage") + f"ctorch\n{_STORAGE_NAMES[array.dtype]}\n".encode()
                        + _item(str(key)) + _item("cpu") + _item(array.size) + b"tQ")
            strides = tuple(s // array.itemsize for s in array.strides)
            pickled += (_item(0) + _item(tuple(array.shape)) + _item(strides)
                        + b"\x89ccollections\nOrderedDict\n)RtR")
            archive.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<"),
                                                                  copy=False).tobytes())
        archive.writestr("archive/data.pkl", bytes(pickled + b"u."))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


def _item(value) -> bytes:
    """The pickle opcodes of a plain value (str, int, tuple of ints), without the frame."""
    return pickle.dumps(value, protocol=2)[2:-1]
