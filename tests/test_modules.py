"""The Flax module tree's building blocks, each against a direct computation. (The whole tree is
checked against upstream in test_golden.py and against the PyTorch oracle in test_oracle_sweep.py.)"""

import jax
import jax.numpy as jnp
import numpy as np

from losatok_jax._modules import (ConvTranspose1d, FrozenBatchNorm, decoder_block, patchify,
                                  stacked)
from losatok_jax.config import LosatokConfig


def test_patchify_lays_out_patches_frame_major_and_drops_trailing_frames():
    spectrogram = np.arange(2 * 9 * 3, dtype=np.float32).reshape(2, 9, 3)  # (B, F, bins)
    patches = np.asarray(patchify(spectrogram, 4))
    assert patches.shape == (2, 2, 12)  # frame 8 is dropped
    np.testing.assert_array_equal(patches[1, 1], spectrogram[1, 4:8].reshape(-1))


def test_frozen_batch_norm_uses_its_running_statistics():
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    params = {"scale": np.array([1.0, 2.0, 0.5], np.float32),
              "bias": np.array([0.0, 1.0, -1.0], np.float32),
              "mean": np.array([0.5, -0.5, 0.0], np.float32),
              "var": np.array([1.0, 4.0, 0.25], np.float32)}
    out = FrozenBatchNorm().apply({"params": params}, x)
    expected = (x - params["mean"]) / np.sqrt(params["var"] + 1e-5) * params["scale"] \
        + params["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_transposed_convolution_writes_each_latent_to_its_own_frames():
    """Kernel 2, stride 2: output frame 2t + k is z_t · W[:, :, k] + bias."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 3, 4)).astype(np.float32)
    module = ConvTranspose1d(5, 2)
    params = module.init(jax.random.key(0), z)["params"]
    out = np.asarray(module.apply({"params": params}, z))
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])  # (in, k, out)
    assert out.shape == (1, 6, 5)
    for t in range(3):
        for k in range(2):
            np.testing.assert_allclose(out[0, 2 * t + k], z[0, t] @ kernel[:, k] + bias,
                                       rtol=1e-5, atol=1e-6)


def test_a_stack_is_its_layers_applied_in_turn():
    config = LosatokConfig(decoder_embed_dim=8, decoder_intermediate_size=16, decoder_depth=3)
    layer = decoder_block(config)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 10, 8)), jnp.float32)
    keep = jnp.ones((1, 10, 1))
    stack = stacked(layer, 3)
    params = stack.init(jax.random.key(0), x, keep)["params"]
    out, _ = stack.apply({"params": params}, x, keep)
    y = x
    for i in range(3):
        y = layer.apply({"params": jax.tree.map(lambda w: w[i], params)}, y, keep)[0]
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
