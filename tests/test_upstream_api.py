"""Upstream's Python API as its README writes it, with only the import line changed: a `.pth`
and its config, `device=`, `model.sample_rate`, librosa loading, a torch tensor in, upstream's
numbers out (the golden vectors)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

import losatok_jax
from losatok_jax import _devices

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN = REPO_ROOT / "tests" / "data" / "golden" / "tiny_chunk40"

UPSTREAM_SNIPPET = textwrap.dedent("""
    import librosa, torch
    from losatok_jax import load_losatok, encode, decode

    model = load_losatok(config_path="config/tiny.yml", model_path="ckpts/losatok.pth",
                         device="cpu")
    wav, sr = librosa.load("example/en.wav", sr=model.sample_rate, mono=True)
    features = encode(model, torch.from_numpy(wav).unsqueeze(0))
    audio_recon = decode(model, features["z"])

    import numpy as np
    np.savez("out.npz", z=features["z"], mu=features["mu"], recon=audio_recon, sr=sr)
""")


def test_upstream_snippet_runs_outside_the_checkout_and_matches_upstream(tmp_path):
    """In a folder of its own (not the checkout), on upstream's `.pth` and config: latents
    within 1e-4 and audio within 1e-5 of upstream's; the `.pth` is converted once, beside it."""
    for folder in ("config", "ckpts", "example"):
        (tmp_path / folder).mkdir()
    shutil.copy(GOLDEN / "config.yml", tmp_path / "config" / "tiny.yml")
    shutil.copy(GOLDEN / "losatok.pth", tmp_path / "ckpts" / "losatok.pth")
    golden = np.load(GOLDEN / "vectors.npz")
    sf.write(tmp_path / "example" / "en.wav", golden["audio"][0], 16000, subtype="FLOAT")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO_ROOT)}
    for run in range(2):
        result = subprocess.run([sys.executable, "-c", UPSTREAM_SNIPPET], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("converted" in result.stdout) == (run == 0)  # once, then reused
    assert (tmp_path / "ckpts" / "losatok.orbax").is_dir()
    out = np.load(tmp_path / "out.npz")
    assert out["sr"] == 16000
    np.testing.assert_allclose(out["mu"][0], golden["mu"][0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["z"][0], golden["z"][0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["recon"][0], golden["recon_audio"][0], rtol=0, atol=1e-5)


def test_package_names_are_the_functions():
    """`losatok_jax.encode` and `.decode` are the API's functions whatever was imported before
    (the latents-to-WAV tool is `losatok_jax.latents_to_wav`)."""
    import losatok_jax.latents_to_wav  # noqa: F401
    import losatok_jax.reconstruct  # noqa: F401

    assert losatok_jax.decode is losatok_jax.api.decode
    assert losatok_jax.encode is losatok_jax.api.encode
    from losatok_jax import decode, encode
    assert callable(decode) and callable(encode)


def test_device_places_the_parameters(tmp_path):
    config = GOLDEN / "config.yml"
    with pytest.warns(UserWarning, match="untrained"):
        placed = losatok_jax.load_losatok(config_path=config, device="cpu:0")
    assert placed.sample_rate == 16000
    assert {d for leaf in jax.tree.leaves(placed.params) for d in leaf.devices()} == {
        jax.devices("cpu")[0]}
    for device, message in (("cuda", "device 'cuda': cannot run on a GPU"),
                            ("tpu", "device 'tpu': cannot run on a TPU"),
                            ("cpu:7", "there are 1 cpu device"),
                            ("npu", "choose cpu, cuda (or gpu) or tpu")):
        with pytest.raises(_devices.DeviceError, match=re.escape(message)):
            losatok_jax.load_losatok(config_path=config, device=device)
    with pytest.raises(ValueError, match="not both"):
        losatok_jax.load_losatok(tmp_path, model_path=tmp_path)
    with pytest.raises(losatok_jax.LosatokError, match="model_path .*missing.pth: no such file"):
        losatok_jax.load_losatok(model_path=tmp_path / "missing.pth")
