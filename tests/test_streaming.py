"""Streaming decode: what comes out equals decoding the whole sequence, as early as the lookahead
says, from fixed step shapes; rows of a batch start and end on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losatok_jax
from losatok_jax import streaming
from losatok_jax.api import StreamingDecoder
from losatok_jax.config import RELEASED_CONFIG, load_config
from losatok_jax.errors import LosatokError
from helpers import AUDIO_TOL, GOLDEN_CASES, compiles_during

SAMPLES_PER_TOKEN = 640


def _latents(batch: int, tokens: int, seed: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, tokens, dim)).astype(np.float32)


def _stream(decoder: StreamingDecoder, z: np.ndarray, pattern) -> np.ndarray:
    """Pushes `z` in chunks of `pattern` latents, checking after each push that every sample
    before 640 · (pushed − lookahead) has come out; returns all of it with the flush."""
    outputs, pushed = [], 0
    for size in pattern:
        outputs.append(decoder.push(z[:, pushed:pushed + size]))
        pushed += size
        returned = sum(out.shape[1] for out in outputs)
        assert returned >= SAMPLES_PER_TOKEN * (pushed - decoder.lookahead_tokens)
    assert pushed == z.shape[1]
    outputs.append(decoder.flush())
    return np.concatenate(outputs, axis=1)


def _random_pattern(total: int, seed: int) -> list[int]:
    rng, pattern = np.random.default_rng(seed), []
    while sum(pattern) < total:
        pattern.append(int(min(rng.integers(0, 12), total - sum(pattern))))
    return pattern


PATTERNS = {"one at a time": lambda t: [1] * t, "fives": lambda t: [5] * (t // 5) + [t % 5],
            "whole": lambda t: [t], "random": lambda t: _random_pattern(t, seed=t)}


@pytest.mark.parametrize("case", GOLDEN_CASES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_streamed_audio_is_upstreams_decode_of_the_whole_sequence(golden_model, golden_vectors,
                                                                  case, pattern):
    """Upstream's decoded audio for its latents (`mu`, and random `z`), one stream (B = 1) and
    two at once (B = 2: a second row reversed in time where upstream decoded one)."""
    golden, model = golden_vectors[case], golden_model(case)
    for latents, audio_key in (("mu", "recon_audio"), ("z_random", "decode_z_random")):
        z, upstream = golden[latents], golden[audio_key].reshape(len(golden[latents]), -1)
        one = _stream(StreamingDecoder(model), z[:1], PATTERNS[pattern](z.shape[1]))
        np.testing.assert_allclose(one, upstream[:1], rtol=0, atol=AUDIO_TOL)
        pair = z[:2] if len(z) == 2 else np.concatenate([z, z[:, ::-1]])
        two = _stream(StreamingDecoder(model, batch_size=2), pair, PATTERNS[pattern](z.shape[1]))
        np.testing.assert_allclose(two[0], upstream[0], rtol=0, atol=AUDIO_TOL)
        np.testing.assert_allclose(two, np.asarray(losatok_jax.decode(model, pair)), rtol=0,
                                   atol=AUDIO_TOL)


def test_long_random_patterns_match_whole_decode(model):
    z = _latents(2, 90, seed=1)
    expected = np.asarray(losatok_jax.decode(model, z))
    for seed in range(3):
        audio = _stream(StreamingDecoder(model, batch_size=2), z, _random_pattern(90, seed))
        np.testing.assert_allclose(audio, expected, rtol=0, atol=AUDIO_TOL)


def test_default_lookahead_is_the_exact_right_receptive_field(model):
    """Changing latent k changes audio from 640 · (k − lookahead) on, and no earlier than one
    latent's worth of samples before that: one latent less of lookahead would not be exact."""
    lookahead = StreamingDecoder(model).lookahead_tokens
    assert lookahead == streaming.right_context_tokens(model.config)
    z = _latents(1, 40, seed=2)
    base = np.asarray(losatok_jax.decode(model, z))[0]
    for k in (lookahead + 1, 25, 39):
        changed = z.copy()
        changed[0, k] += 1.0
        first_change = np.flatnonzero(np.asarray(losatok_jax.decode(model, changed))[0]
                                      != base)[0]
        assert SAMPLES_PER_TOKEN * (k - lookahead) <= first_change
        assert first_change < SAMPLES_PER_TOKEN * (k - lookahead + 1)
        # The first frame it reaches starts there; its window's first samples (0, 6e-6, ...,
        # 4e-4 at the 8th) can leave the float32 sums as they were.
        frame_start = SAMPLES_PER_TOKEN * k - streaming.right_context_samples(model.config)
        assert frame_start <= first_change <= frame_start + 8


def test_released_models_lookahead():
    released = load_config(RELEASED_CONFIG)
    assert streaming.right_context_samples(released) == 39 * 320 + 480  # 12960: 0.81 s
    assert streaming.right_context_tokens(released) == 21


def test_smaller_lookaheads_return_audio_sooner_and_approximate(model):
    z = _latents(1, 40, seed=3)
    expected = np.asarray(losatok_jax.decode(model, z))
    exact = streaming.right_context_tokens(model.config)
    errors = []
    for lookahead in range(exact + 1):
        decoder = StreamingDecoder(model, lookahead_tokens=lookahead)
        assert decoder.delay_samples == min(SAMPLES_PER_TOKEN * lookahead,
                                            streaming.right_context_samples(model.config))
        audio = _stream(decoder, z, [1] * 40)
        assert audio.shape == expected.shape
        errors.append(np.abs(audio - expected).max())
    assert errors[-1] <= AUDIO_TOL
    assert all(error > AUDIO_TOL for error in errors[:-1])  # only the exact lookahead is exact
    assert all(np.diff(errors) < 0)  # each latent more of lookahead does better


def test_nothing_compiles_after_warmup(model):
    decoder = StreamingDecoder(model, batch_size=2, lookahead_tokens=2)
    assert compiles_during(decoder.warmup)
    z = _latents(2, 120, seed=4)

    def serve():
        for pattern in (_random_pattern(120, seed=5), [1] * 30 + [90], [63, 57]):
            _stream(decoder, z, pattern)
        decoder.push(z[:, :7])
        decoder.end([1])
        decoder.reset([1])
        decoder.push(z[:, 7:40])
        decoder.flush()

    assert compiles_during(serve) == []


def test_api_warmup_covers_streaming(model):
    small = losatok_jax.Buckets(batch_sizes=(1,), num_tokens=(16,))
    assert losatok_jax.warmup(model, small, decode_too=False, stream_batch_sizes=(3,)) > 0
    assert compiles_during(lambda: _stream(StreamingDecoder(model, batch_size=3),
                                           _latents(3, 30, seed=6), [4, 11, 15])) == []


def test_rows_end_and_start_again_while_others_go_on(model):
    z = _latents(2, 40, seed=7)
    other = _latents(1, 25, seed=8)
    decoder = StreamingDecoder(model, batch_size=2)
    first = decoder.push(z[:, :10])
    tail = decoder.end([1])  # row 1's stream ends after 10 latents
    assert tail.shape[0] == 1
    feed = z.copy()
    feed[1, 15:] = other[0]
    middle = decoder.push(feed[:, 10:15])  # row 1's latents here are ignored: it has ended
    decoder.reset([1])  # and a new stream starts in row 1 at latent 15
    rest = [decoder.push(feed[:, 15:40]), decoder.flush()]
    row0 = np.concatenate([first, middle, *rest], axis=1)[0]
    np.testing.assert_allclose(row0, np.asarray(losatok_jax.decode(model, z[:1]))[0],
                               atol=AUDIO_TOL)
    ended = np.concatenate([first[1], tail[0]])
    np.testing.assert_allclose(ended, np.asarray(losatok_jax.decode(model, z[1:, :10]))[0],
                               atol=AUDIO_TOL)
    assert not middle[1].any()
    restarted = np.concatenate(rest, axis=1)[1]
    delay = decoder.delay_samples
    assert not restarted[:delay].any()
    np.testing.assert_allclose(restarted[delay:], np.asarray(losatok_jax.decode(model, other))[0],
                               atol=AUDIO_TOL)


def test_pure_step_inside_a_jitted_scan_equals_the_decoder(model):
    """A generation loop's view: `init`, then `step` under `lax.scan` on fixed chunks, `end`,
    and more steps to drain; the audio is the stream delayed by `right_context_samples`."""
    chunk, chunks = 2, 20
    z = _latents(2, chunk * chunks, seed=9)
    drain = -(-streaming.right_context_tokens(model.config) // chunk)

    @jax.jit
    def generate(model, z):
        def body(state, z_chunk):
            return streaming.step(model, state, z_chunk)

        chunked = jnp.moveaxis(z.reshape(2, chunks, chunk, -1), 1, 0)
        state, audio = jax.lax.scan(body, streaming.init(model, 2), chunked)
        state = streaming.end(state)
        _, tail = jax.lax.scan(body, state, jnp.zeros((drain, 2, chunk, z.shape[-1])))
        return jnp.concatenate([audio, tail]).transpose(1, 0, 2).reshape(2, -1)

    audio = np.asarray(generate(model, z))
    delay = streaming.right_context_samples(model.config)
    expected = np.asarray(losatok_jax.decode(model, z))
    assert not audio[:, :delay].any()
    streamed = audio[:, delay:delay + expected.shape[1]]
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=AUDIO_TOL)
    assert not audio[:, delay + expected.shape[1]:].any()
    np.testing.assert_allclose(streamed, _stream(StreamingDecoder(model, batch_size=2), z, [5] * 8),
                               rtol=0, atol=1e-6)


def test_bfloat16_streams_like_bfloat16_decode(model):
    low = model.astype("bfloat16")
    z = _latents(1, 30, seed=10)
    audio = _stream(StreamingDecoder(low), z, [3] * 10)
    whole = np.asarray(losatok_jax.decode(low, z))
    exact = np.asarray(losatok_jax.decode(model, z))
    assert np.abs(audio - whole).max() < 0.1 * np.abs(whole - exact).max()


@pytest.mark.parametrize("make, message", [
    (lambda m: StreamingDecoder(m, batch_size=0), "batch_size"),
    (lambda m: StreamingDecoder(m, lookahead_tokens=-1), "lookahead_tokens"),
    (lambda m: StreamingDecoder(m, lookahead_tokens=99), "lookahead_tokens"),
    (lambda m: StreamingDecoder(m).push(np.zeros((2, 3, 16), np.float32)), r"\(1, t, 16\)"),
    (lambda m: StreamingDecoder(m).push(np.zeros((1, 3, 8), np.float32)), r"\(1, t, 16\)"),
    (lambda m: StreamingDecoder(m).push(np.zeros((1, 3, 16), np.int32)), "floating"),
    (lambda m: StreamingDecoder(m).push(np.full((1, 3, 16), np.nan, np.float32)), "NaN"),
    (lambda m: StreamingDecoder(m, batch_size=2).end([2]), "rows"),
    (lambda m: StreamingDecoder(m, batch_size=2).reset([]), "rows"),
])
def test_bad_input_is_one_clear_error(model, make, message):
    with pytest.raises(LosatokError, match=message):
        make(model)
