"""Running batch plans: padded batches, streaming windows and bounded compilation give each clip
what it gets alone.

The reference for "a clip processed alone" is the unbucketed, unwindowed model: one jitted call on
exactly that clip's samples (or latents). Small buckets make the 10-token semantic chunks (encode
windows) and the 64-token decode windows of the tiny golden model exercise every path in a few
seconds.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import broadband_audio, compiles_during
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import losatok_jax
from losatok_jax import Buckets, FEATURE_KEYS
from losatok_jax import _batching
from losatok_jax._batching import decoder_gap, decoder_halo
# Encode rows: 4 tokens or one 10-token chunk; decode rows: 4, 16 or 64 tokens.
SMALL = Buckets(batch_sizes=(1, 2, 4), num_tokens=(4, 16, 64))
FEATURE_TOL = 1e-4
AUDIO_TOL = 1e-5


@jax.jit
def _whole_encode(model, audio):
    return model.apply(audio, method="encode")


@jax.jit
def _whole_decode(model, z):
    return model.apply(z, method="decode")


def alone(model, clip):
    """The clip encoded by itself in one piece: no bucket, no window, no batch."""
    out = _whole_encode(model, clip[None])
    return {key: np.asarray(out[key][0]) for key in FEATURE_KEYS}


def clip_of(num_samples: int, seed: int) -> np.ndarray:
    clip = broadband_audio(1, num_samples, seed)[0]
    clip[num_samples // 3: num_samples // 3 + 2000] = 0.0  # digital silence: the floor engages
    return clip


def assert_features_close(actual, expected, tol=FEATURE_TOL):
    for key in FEATURE_KEYS:
        assert actual[key].shape == expected[key].shape, key
        error = np.max(np.abs(actual[key] - expected[key]))
        assert error <= tol, f"{key}: max|Δ| {error:.2e} > {tol:g}"


# Lengths around the encode window (10 tokens = 6,400 samples) and the 64-token decode window, a
# token boundary ±1 sample, frame counts not divisible by 4, and many windows with a short tail.
STREAMING_LENGTHS = [10 * 640 - 1, 10 * 640, 64 * 640 + 479, 64 * 640 + 480, 120 * 640 + 161,
                     181 * 640 + 333, 16000 * 20 + 7]


@pytest.mark.parametrize("num_samples", STREAMING_LENGTHS)
def test_streaming_encode_and_decode_equal_whole(model, num_samples):
    clip = clip_of(num_samples, seed=num_samples)
    expected = alone(model, clip)
    [streamed] = losatok_jax.encode(model, [clip], buckets=SMALL)
    assert_features_close(streamed, expected)

    z = expected["z"]
    whole_audio = np.asarray(_whole_decode(model, z[None]))[0]
    [streamed_audio] = losatok_jax.api.decode(model, [z], buckets=SMALL)
    assert streamed_audio.shape == (640 * len(z),)
    assert np.max(np.abs(streamed_audio - whole_audio)) <= AUDIO_TOL


def test_decode_halo_is_needed(model):
    """The halo is not slack: without it, window seams differ from the whole decode."""
    z = alone(model, clip_of(150 * 640, seed=3))["z"]
    whole_audio = np.asarray(_whole_decode(model, z[None]))[0]
    central = SMALL.max_tokens - decoder_halo(model.config)  # the first window's outputs
    cut = np.asarray(_whole_decode(model, z[None, :central]))[0]
    seam_error = np.max(np.abs(cut[-640:] - whole_audio[central * 640 - 640:central * 640]))
    assert decoder_halo(model.config) > 0 and seam_error > 100 * AUDIO_TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(513, 5 * 16000), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_batch_members_equal_alone(model, lengths, seed):
    clips = [clip_of(n, seed + i) for i, n in enumerate(lengths)]
    batched = losatok_jax.encode(model, clips, buckets=SMALL)
    solo = [losatok_jax.encode(model, [clip], buckets=SMALL)[0] for clip in clips]
    for got, expected in zip(batched, solo):
        assert_features_close(got, expected)
    audio = losatok_jax.api.decode(model, [f["z"] for f in batched], buckets=SMALL)
    for clip_audio, f in zip(audio, solo):
        [expected_audio] = losatok_jax.api.decode(model, [f["z"]], buckets=SMALL)
        assert np.max(np.abs(clip_audio - expected_audio)) <= AUDIO_TOL


@pytest.mark.parametrize("num_samples", [513, 7999, 16 * 640 + 479, 30000])
def test_bucket_padding_equals_alone(model, num_samples):
    """A clip padded into a bucket row beside a longer one equals the unpadded computation."""
    clip = clip_of(num_samples, seed=num_samples)
    partner = clip_of(40000, seed=1)
    got = losatok_jax.encode(model, [partner, clip], buckets=SMALL)[1]
    assert_features_close(got, alone(model, clip))
    z = got["z"]
    [audio] = losatok_jax.api.decode(model, [np.zeros((37, z.shape[1]), np.float32) + 0.3, z],
                                 buckets=SMALL)[1:]
    whole_audio = np.asarray(_whole_decode(model, z[None]))[0]
    assert np.max(np.abs(audio - whole_audio)) <= AUDIO_TOL


def test_arrays_and_lists_agree(model):
    batch = broadband_audio(3, 30000, seed=5)
    as_array = losatok_jax.encode(model, batch, buckets=SMALL)
    as_list = losatok_jax.encode(model, list(batch), buckets=SMALL)
    for key in FEATURE_KEYS:
        np.testing.assert_array_equal(as_array[key], np.stack([f[key] for f in as_list]))
    audio = losatok_jax.api.decode(model, as_array["z"], buckets=SMALL)
    assert audio.shape == (3, 640 * as_array["z"].shape[1])


def test_sampling_does_not_depend_on_batching(model):
    clips = [clip_of(n, seed=n) for n in (9000, 45000, 90000)]
    rng = jax.random.key(7)
    small = losatok_jax.encode(model, clips, sample=True, rng=rng, buckets=SMALL)
    large = losatok_jax.encode(model, clips, sample=True, rng=rng,
                               buckets=Buckets(batch_sizes=(4,), num_tokens=(256,)))
    for a, b in zip(small, large):
        assert np.max(np.abs(a["z"] - b["z"])) <= FEATURE_TOL
        assert np.max(np.abs(a["z"] - a["mu"])) > 1e-3  # it did sample


def test_feature_subset(model):
    [only_z] = losatok_jax.encode(model, [clip_of(20000, 1)], buckets=SMALL, features=("z",))
    assert set(only_z) == {"z"}
    with pytest.raises(ValueError, match="subset"):
        losatok_jax.encode(model, [clip_of(20000, 1)], features=("zz",))


def test_list_inputs_are_validated(model):
    with pytest.raises(ValueError, match="clip 1: audio has 100 samples"):
        losatok_jax.encode(model, [clip_of(20000, 1), np.zeros(100, np.float32)])
    with pytest.raises(ValueError, match="clip 0 must be 1-D"):
        losatok_jax.encode(model, [np.zeros((2, 20000), np.float32)])
    with pytest.raises(ValueError, match="no clips"):
        losatok_jax.encode(model, [])
    with pytest.raises(ValueError, match=r"latents 0 must be shaped \(T, 16\)"):
        losatok_jax.api.decode(model, [np.zeros(16, np.float32)])


def test_no_compilation_after_warmup(model):
    buckets = Buckets(batch_sizes=(1, 4), num_tokens=(32, 256))
    programs = losatok_jax.warmup(model, buckets, features=("z",))
    assert programs == 2 * (1 + 3 + 3 * 2)  # per batch size: peak pass, then stem, layer and
    # finish programs for the 10-token encode and each of 2 decodes

    def serve():
        rng = np.random.default_rng(0)
        for _ in range(5):
            lengths = rng.uniform(0.5, 60.0, size=rng.integers(1, 7)) * 16000
            clips = [clip_of(int(n), seed=int(n)) for n in lengths]
            latents = losatok_jax.encode(model, clips, buckets=buckets, features=("z",))
            losatok_jax.api.decode(model, [f["z"] for f in latents], buckets=buckets)

    assert compiles_during(serve) == []


# Decode rows of SMALL's 64 tokens: the long clip's last window shares a row with the 9-token
# clip, and the 40- and 3-token clips share one.
PACKED_LENGTHS = (150, 40, 9, 3)


def packed_latents(model):
    rng = np.random.default_rng(11)
    return [rng.standard_normal((n, model.config.decoder_dim)).astype(np.float32)
            for n in PACKED_LENGTHS]


def test_packed_decode_rows_equal_each_clip_alone(model):
    c = model.config
    latents = packed_latents(model)
    rows = _batching.plan_decode_rows(c, SMALL, [len(z) for z in latents])
    shared = [row.pieces for row in rows if len(row.pieces) > 1]
    assert len(shared) == 2 and any(p.source > 0 for row in shared for p, _ in row)
    for z, audio in zip(latents, losatok_jax.api.decode(model, latents, buckets=SMALL)):
        whole_audio = np.asarray(_whole_decode(model, z[None]))[0]
        assert np.max(np.abs(audio - whole_audio)) <= AUDIO_TOL


def test_decode_gap_is_needed(model, monkeypatch):
    """One latent less between packed windows, and neighbours reach into each other's audio."""
    gap = decoder_gap(model.config)
    monkeypatch.setattr(_batching, "decoder_gap", lambda config: gap - 1)
    latents = packed_latents(model)
    errors = [np.max(np.abs(audio - np.asarray(_whole_decode(model, z[None]))[0]))
              for z, audio in zip(latents, losatok_jax.api.decode(model, latents, buckets=SMALL))]
    assert max(errors) > 100 * AUDIO_TOL


def test_row_buffers_take_turns_and_leave_nothing_stale(model):
    """Batches of one shape alternate two buffers; another shape starts afresh; a reused buffer
    (here full of NaN) is written whole: every real row, and zeros in the filler rows."""
    from losatok_jax import _execution

    config = model.config
    rows = _execution._RowBuffers()
    first, second, third = (rows.take(4, 16, config) for _ in range(3))
    assert first is not second and third is first
    assert rows.take(4, 16, config) is second
    other = rows.take(2, 16, config)
    assert other is not first and other is not second

    clips = [clip_of(n, seed=n) for n in (7000, 9000, 30000)]
    pieces = [p for i, clip in enumerate(clips)
              for p in _batching.encode_pieces(config, i, config.num_tokens(len(clip)))][:3]
    stale = np.full_like(first, np.nan)
    buffers, valid = _execution._window_rows(config, clips, pieces, 16, stale)
    fresh = np.zeros_like(first)
    expected, expected_valid = _execution._window_rows(config, clips, pieces, 16, fresh)
    np.testing.assert_array_equal(buffers, expected)
    np.testing.assert_array_equal(valid, expected_valid)
    assert not np.any(buffers[len(pieces):])


def test_reused_row_buffers_change_nothing(model, monkeypatch):
    """Clips encoded in several batches of one shape, through reused buffers, get bitwise what
    they get through a fresh zeroed buffer per batch."""
    from losatok_jax import _execution

    clips = [clip_of(6000 + 97 * i, seed=i) for i in range(11)]  # 3 batches of 4 rows
    reused = losatok_jax.encode(model, clips, buckets=SMALL)
    monkeypatch.setattr(_execution._RowBuffers, "take", lambda self, size, window, config:
                        np.zeros((size, _batching.window_samples(config, window)), np.float32))
    fresh = losatok_jax.encode(model, clips, buckets=SMALL)
    for got, expected in zip(reused, fresh):
        for key in FEATURE_KEYS:
            np.testing.assert_array_equal(got[key], expected[key])
