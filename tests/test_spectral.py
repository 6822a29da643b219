"""The parameter-free signal processing: windows, mel filterbanks, STFT front ends and the ISTFT,
each against an independent numpy or librosa computation."""

import jax
import librosa
import numpy as np
import pytest
import scipy.signal

from losatok_jax import spectral


def test_hann_window_is_periodic():
    np.testing.assert_allclose(spectral.hann_window(512), scipy.signal.get_window("hann", 512),
                               atol=1e-7)
    assert spectral.hann_window(8)[0] == 0 and spectral.hann_window(8)[4] == 1


@pytest.mark.parametrize("n_fft, n_mels", [(512, 64), (1024, 128)])
def test_mel_filterbank_is_htk_without_normalisation(n_fft, n_mels):
    ours = spectral.mel_filterbank(n_fft, n_mels, 16000, 0.0, 8000.0)
    reference = librosa.filters.mel(sr=16000, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=8000.0,
                                    htk=True, norm=None)
    assert ours.shape == (n_fft // 2 + 1, n_mels) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference.T, atol=2e-5)
    assert ours.max() <= 1.0 + 1e-6


def test_power_spectrogram_is_the_windowed_rfft_of_reflect_padded_frames():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((2, 3000)).astype(np.float32)
    padded = np.asarray(spectral.reflect_pad(audio, 256))
    np.testing.assert_array_equal(padded, np.pad(audio, ((0, 0), (256, 256)), mode="reflect"))
    frames = 1 + 3000 // 160
    power = np.asarray(spectral.power_spectrogram(padded, n_fft=512, hop=160, num_frames=frames))
    index = np.arange(frames)[:, None] * 160 + np.arange(512)
    expected = np.abs(np.fft.rfft(padded[:, index] * spectral.hann_window(512), axis=-1)) ** 2
    np.testing.assert_allclose(power, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n_fft", [512, 1024])
def test_the_windowed_dft_product_is_the_windowed_rfft(n_fft):
    """What a TPU computes for each frame instead of an FFT (the CPU runs the rfft)."""
    frames = np.random.default_rng(n_fft).standard_normal((3, 11, n_fft)).astype(np.float32)
    expected = np.fft.rfft(frames.astype(np.float64) * spectral.hann_window(n_fft), axis=-1)
    halves = frames.astype(np.float64) @ spectral.windowed_dft(n_fft).astype(np.float64)
    bins = n_fft // 2 + 1
    np.testing.assert_allclose(halves[..., :bins], expected.real, atol=2e-5)
    np.testing.assert_allclose(halves[..., bins:], expected.imag, atol=2e-5)
    power = np.asarray(jax.jit(spectral._power_by_product)(frames))
    np.testing.assert_allclose(power, np.abs(expected) ** 2, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("frames", [1, 8, 19, 403])
def test_a_frames_spectrum_does_not_depend_on_how_many_frames_are_computed(frames):
    signal = np.random.default_rng(frames).standard_normal((2, 160 * (frames + 8) + 512))
    signal = signal.astype(np.float32)
    whole = spectral.power_spectrogram(signal, n_fft=512, hop=160, num_frames=frames + 8)
    np.testing.assert_array_equal(
        spectral.power_spectrogram(signal, n_fft=512, hop=160, num_frames=frames),
        whole[:, :frames])


@pytest.mark.parametrize("n_fft,hop,offset", [(512, 160, 256), (1024, 160, 0), (64, 64, 3),
                                              (30, 7, 13)])
def test_frames_are_the_overlapping_windows_of_the_signal(n_fft, hop, offset):
    signal = np.arange(2 * 900, dtype=np.float32).reshape(2, 900)
    num_frames = (900 - offset - n_fft) // hop + 1
    index = offset + np.arange(num_frames)[:, None] * hop + np.arange(n_fft)
    np.testing.assert_array_equal(
        spectral.frames(signal, n_fft=n_fft, hop=hop, num_frames=num_frames, offset=offset),
        signal[:, index])


def test_db_floor_follows_each_rows_own_peak():
    db = np.array([[[0.0, -200.0]], [[-50.0, -300.0]]], np.float32)  # (B=2, F=1, mels=2)
    peak = spectral.peak_db(db, np.ones((2, 1), bool))
    np.testing.assert_array_equal(peak, [0.0, -50.0])
    np.testing.assert_array_equal(spectral.floor_db(db, peak), [[[0.0, -120.0]], [[-50.0, -170.0]]])
    masked = spectral.peak_db(np.array([[[0.0], [5.0]]], np.float32), np.array([[True, False]]))
    assert float(masked[0]) == 0.0  # padded frames never set the floor


def test_overlap_add_sums_shifted_frames():
    frames = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    expected = np.zeros((2, 16), np.float32)  # (3 - 1 + 8 // 4) hops of 4
    for f in range(3):
        expected[:, 4 * f:4 * f + 8] += frames[:, f]
    np.testing.assert_array_equal(spectral.overlap_add(frames, 4), expected)


def test_istft_inverts_the_stft_of_a_signal_inside_the_covered_span():
    """A centred STFT's frames, re-synthesised: the interior of the signal comes back."""
    n_fft, hop = 1280, 320
    rng = np.random.default_rng(1)
    signal = rng.standard_normal(hop * 40).astype(np.float32)
    padded = np.pad(signal, (n_fft // 2 - hop // 2, n_fft // 2 - hop // 2))
    frames = np.stack([padded[i * hop:i * hop + n_fft] * spectral.hann_window(n_fft)
                       for i in range(40)])
    spectrum = np.fft.rfft(frames, axis=-1)
    log_magnitude = np.log(np.maximum(np.abs(spectrum), 1e-12))[None]
    phase = np.angle(spectrum)[None]
    out = np.asarray(spectral.istft_same(log_magnitude, phase, np.ones((1, 40, 1), np.float32),
                                         n_fft=n_fft, hop=hop))
    assert out.shape == (1, 40 * hop)
    inner = slice(n_fft, 40 * hop - n_fft)
    np.testing.assert_allclose(out[0, inner], signal[inner], atol=1e-4)
