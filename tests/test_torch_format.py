"""PyTorch's checkpoint format without PyTorch: what `torch.save` writes we read (memory-mapped,
views and dtypes included), what we write `torch.load` reads, and nothing else gets built."""

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from losatok_jax import _torch_format


def test_reads_what_torch_saves(tmp_path):
    base = torch.randn(6, 5)
    state = collections.OrderedDict(
        weight=torch.randn(3, 4), view=base[2:5, 1:], transposed=base.t(),
        half=torch.randn(2, 3).half(), bf16=torch.randn(4).bfloat16(),
        steps=torch.tensor(7), parameter=torch.nn.Parameter(torch.ones(2)))
    torch.save({"state_dict": state}, tmp_path / "m.pth")
    loaded = _torch_format.Checkpoint(tmp_path / "m.pth").load()["state_dict"]
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        ours = loaded[name]
        assert ours.shape == tuple(tensor.shape)
        values = ours.numpy()
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 \
            else tensor.detach().numpy()
        np.testing.assert_array_equal(values.astype(expected.dtype), expected, err_msg=name)
        ours.release()  # dropping the pages keeps the values (they are read again)
        np.testing.assert_array_equal(ours.numpy().astype(expected.dtype), expected)
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16


def test_torch_loads_what_we_save(tmp_path):
    arrays = {"z": np.arange(12, dtype=np.float32).reshape(1, 3, 4),
              "low": np.ones((2, 2), ml_dtypes.bfloat16),
              "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    _torch_format.save(tmp_path / "f.pt", arrays)
    loaded = torch.load(tmp_path / "f.pt", weights_only=True)
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name].float().numpy(), array.astype(np.float32))
    assert loaded["low"].dtype == torch.bfloat16


def test_nothing_but_tensors_is_built(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (print, ("ran code",))

    buffer = io.BytesIO()
    torch.save({"x": torch.ones(1)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as original, \
            zipfile.ZipFile(tmp_path / "bad.pth", "w") as bad:
        for name in original.namelist():
            data = original.read(name)
            bad.writestr(name, pickle.dumps(Sneaky(), protocol=2)
                         if name.endswith("data.pkl") else data)
    with pytest.raises(_torch_format.TorchFormatError, match="unexpected object __builtin__.print"):
        _torch_format.Checkpoint(tmp_path / "bad.pth").load()
    (tmp_path / "old.pth").write_bytes(b"\x80\x02legacy pickle, not a zip")
    with pytest.raises(_torch_format.TorchFormatError, match="torch < 1.6"):
        _torch_format.Checkpoint(tmp_path / "old.pth")
