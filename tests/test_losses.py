"""Losses: upstream's latent losses against the golden values, waveform losses against closed forms.

The golden tests feed the upstream float32 features from vectors.npz, so they test the formulas
alone; one test goes through the converted model to check the encode-dict keys and `sembo_recon`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import GOLDEN_CASES, broadband_audio
from losatok_jax import losses

RTOL = 1e-4  # the golden README's tolerance for losses


def _clamp(vectors):
    clamp = float(vectors["kl_clamp"])
    return None if np.isnan(clamp) else clamp


def _features(vectors):
    keys = ("mu", "logvar", "semantic_emb", "acoustic_emb", "semantic_emb_low", "acoustic_emb_low")
    return {key: jnp.asarray(vectors[key]) for key in keys}


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_latent_losses_match_golden(golden_vectors, case):
    v = golden_vectors[case]
    f = _features(v)
    kl = losses.kl_loss(f["mu"], f["logvar"], _clamp(v))
    semantic = losses.semantic_loss(f, "both")
    sembo = losses.sembo_loss(f["semantic_emb"], jnp.asarray(v["sembo_recon"]),
                              f["semantic_emb_low"])
    np.testing.assert_allclose(kl, v["kl_loss"], rtol=RTOL)
    np.testing.assert_allclose(semantic, v["semantic_loss_both"], rtol=RTOL)
    np.testing.assert_allclose(sembo["mse_loss"], v["sembo_mse_loss"], rtol=RTOL)
    np.testing.assert_allclose(sembo["relation_loss"], v["sembo_relation_loss"], rtol=RTOL)
    np.testing.assert_allclose(sembo["total_loss"],
                               v["sembo_mse_loss"] + v["sembo_relation_loss"], rtol=RTOL)


def test_kl_clamp_floors_each_dim(golden_vectors):
    v = golden_vectors["tiny_chunk1008"]
    f = _features(v)
    unclamped = losses.kl_loss(f["mu"], f["logvar"])
    assert float(unclamped) < float(v["kl_loss"])  # the golden clamp is active on some dims
    mu = jnp.zeros((1, 3, 4))  # KL of the prior itself is 0, floored to 4 dims × clamp
    np.testing.assert_allclose(losses.kl_loss(mu, mu), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.kl_loss(mu, mu, clamp=0.01), 0.04, rtol=1e-6)


def test_semantic_modes_split_the_two_terms(golden_vectors):
    f = _features(golden_vectors["tiny_chunk40"])
    high = losses.semantic_loss(f, "high_only")
    low = losses.semantic_loss(f, "low_only")
    expected_high = np.mean((f["acoustic_emb"] - f["semantic_emb"]) ** 2)
    np.testing.assert_allclose(high, expected_high, rtol=1e-6)
    np.testing.assert_allclose(high + low, losses.semantic_loss(f, "both"), rtol=1e-6)
    with pytest.raises(ValueError, match="high_only"):
        losses.semantic_loss(f, "high")


def test_logvar_loss():
    logvar = jnp.arange(12.0).reshape(1, 3, 4) / 10
    expected = np.mean(np.sum(np.asarray(logvar) ** 2, axis=-1))
    np.testing.assert_allclose(losses.logvar_loss(logvar), expected, rtol=1e-6)


def test_targets_are_stopped(golden_vectors):
    """Semantic and SemBo losses train the student side only, as upstream's detach()."""
    f = _features(golden_vectors["tiny_chunk40"])
    grads = jax.grad(lambda f: losses.semantic_loss(f))(f)
    assert not jnp.any(grads["semantic_emb"]) and not jnp.any(grads["semantic_emb_low"])
    assert jnp.any(grads["acoustic_emb"]) and jnp.any(grads["acoustic_emb_low"])
    recon = jnp.asarray(golden_vectors["tiny_chunk40"]["sembo_recon"])
    emb_grad, recon_grad, low_grad = jax.grad(
        lambda *x: losses.sembo_loss(*x)["total_loss"], argnums=(0, 1, 2))(
        f["semantic_emb"], recon, f["semantic_emb_low"])
    assert not jnp.any(emb_grad)
    assert jnp.any(recon_grad) and jnp.any(low_grad)


def test_sembo_loss_through_the_model(golden_model, golden_vectors):
    """The model's own `encode` features and `sembo_recon` give upstream's loss values."""
    model = golden_model("tiny_chunk40")
    v = golden_vectors["tiny_chunk40"]
    features = model.apply(jnp.asarray(v["audio"]), method="encode")
    recon = model.apply(features["semantic_emb"], method="sembo_recon")
    sembo = losses.sembo_loss(features["semantic_emb"], recon, features["semantic_emb_low"])
    np.testing.assert_allclose(sembo["mse_loss"], v["sembo_mse_loss"], rtol=RTOL)
    np.testing.assert_allclose(sembo["relation_loss"], v["sembo_relation_loss"], rtol=RTOL)
    np.testing.assert_allclose(losses.semantic_loss(features), v["semantic_loss_both"], rtol=RTOL)


@pytest.fixture(scope="module")
def audio():
    return jnp.asarray(broadband_audio(2, 4000, seed=3))


@pytest.mark.parametrize("gain", [0.5, 2.0])
def test_waveform_losses_of_a_gain_have_closed_forms(audio, gain):
    """Scaling a signal by g scales every magnitude by g: log-domain distances are |log g| and
    spectral convergence is |g − 1| (no floor is active on broadband audio)."""
    mel = losses.multi_resolution_mel_loss(gain * audio, audio)
    stft = losses.multi_resolution_stft_loss(gain * audio, audio)
    np.testing.assert_allclose(mel, abs(np.log(gain)), rtol=1e-4)
    np.testing.assert_allclose(stft["log_magnitude"], abs(np.log(gain)), rtol=1e-4)
    np.testing.assert_allclose(stft["spectral_convergence"], abs(gain - 1), rtol=1e-4)
    np.testing.assert_allclose(stft["total_loss"],
                               stft["log_magnitude"] + stft["spectral_convergence"], rtol=1e-6)


def test_waveform_losses_see_missing_bands_more_than_a_delay(audio):
    """A one-sample delay barely changes any spectrogram; losing the top 4 kHz does."""
    delayed = jnp.roll(audio, 1, axis=1)
    spectrum = np.fft.rfft(np.asarray(audio))
    spectrum[:, spectrum.shape[1] // 2:] = 0
    lowpassed = jnp.asarray(np.fft.irfft(spectrum, n=audio.shape[1]), jnp.float32)
    assert float(losses.multi_resolution_mel_loss(delayed, audio)) < 0.05
    assert float(losses.multi_resolution_mel_loss(lowpassed, audio)) > 0.5
    assert float(losses.multi_resolution_stft_loss(lowpassed, audio)["total_loss"]) > 10 * float(
        losses.multi_resolution_stft_loss(delayed, audio)["total_loss"])


def test_waveform_losses_jit_and_grad(audio):
    def total(pred, target):
        return (losses.multi_resolution_mel_loss(pred, target)
                + losses.multi_resolution_stft_loss(pred, target)["total_loss"])

    value_and_grad = jax.jit(jax.value_and_grad(total))
    value, grad = value_and_grad(0.5 * audio, audio)
    np.testing.assert_allclose(value, total(0.5 * audio, audio), rtol=1e-5)  # jit == eager
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0
    # At pred == target the loss is 0 and its gradient finite (no NaN from norms or logs), as on
    # silence.
    for pred, target in ((audio, audio), (jnp.zeros_like(audio), jnp.zeros_like(audio))):
        value, grad = value_and_grad(pred, target)
        assert abs(float(value)) < 1e-6
        assert bool(jnp.all(jnp.isfinite(grad)))


def test_waveform_losses_reject_bad_shapes(audio):
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        losses.multi_resolution_mel_loss(audio[:, :-1], audio)
    with pytest.raises(ValueError, match="more than 1024 samples"):
        losses.multi_resolution_stft_loss(audio[:, :1000], audio[:, :1000])
