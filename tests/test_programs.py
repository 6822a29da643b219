"""The jitted programs' helpers: window lengths invert, and sampling noise is keyed by clip and
token alone."""

import jax
import numpy as np

from losatok_jax import _batching, _programs
from losatok_jax.config import LosatokConfig


def test_window_tokens_inverts_the_window_length():
    config = LosatokConfig()
    for window in (1, 4, 25, 252, 1512):
        buffers = np.zeros((1, _batching.window_samples(config, window)), np.float32)
        assert _programs.window_tokens(config, buffers) == window


def test_noise_depends_on_clip_and_token_only():
    rng = jax.random.key(3)
    whole = np.asarray(_programs.token_noise(rng, np.array([7]), np.array([0]), 10, 4))[0]
    later = np.asarray(_programs.token_noise(rng, np.array([5, 7]), np.array([0, 6]), 4, 4))[1]
    np.testing.assert_array_equal(later, whole[6:10])  # same clip id, tokens 6..9
    other = np.asarray(_programs.token_noise(rng, np.array([8]), np.array([0]), 10, 4))[0]
    assert not np.allclose(other, whole)
    assert _programs.noise_for(None, None, None, None, 3) is None
