"""LoSATok as Flax modules whose parameter tree mirrors upstream's state-dict keys.

    AudioVAE
      semantic_encoder/encoder      MiDashengLM audio transformer (frozen upstream)
      semantic_encoder/bottleneck   SemBo down/up MLPs
      dasheng_tokenizer/encoder     acoustic patch conv + LayerNorm
      dasheng_tokenizer/upsampler   ConvTranspose1d, one latent -> `upsample_tokens` decoder frames
      dasheng_tokenizer/decoder     Vocos backbone + ISTFT head
      fc_a, fc_mu, fc_logvar        VAE head

Repeated layers (`blocks`, `convnext`) are `nn.scan`s over stacked parameters, so compile time does
not grow with depth; `encode` and `decode` are split into stages around them (`encode_stem`,
`run_stack`, `encode_finish`; `decode_stem`, `run_stack`, `decode_finish`) so that the CPU runner
can run one compiled layer per layer instead (`LAYER_STACKS`). Spectral front ends and the ISTFT
are parameter-free (`spectral.py`). Every linear layer is a `_layers.Linear`, its `weight` stored
(out, in) as upstream's.
Shape letters: B batch, N samples, F frames, T tokens, E/C/D/I widths.

`AudioVAE(config, dtype=...)` chooses the compute dtype of the heavy layers: the transformer blocks
and the Vocos backbone and head (`LOW_PRECISION_SCOPES`). Everything else stays float32 whatever the
dtype: both front ends, the patch embeddings, BatchNorm, the encoder's final norm, SemBo, the VAE
head, the upsampler and the ISTFT (the head's product is returned in float32). These are < 0.5% of
the FLOPs. So every returned feature and the audio are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from losatok_jax import spectral
from losatok_jax._layers import (DECODER_KERNEL, ConvNeXtBlock, Linear, TransformerBlock,
                                 compute_dtype, gelu, layer_norm)
from losatok_jax.config import LosatokConfig, SemanticEncoderConfig

# Parameter-tree prefixes of the layers that compute in the model's dtype; `Losatok.astype` stores
# the weights and kernels under them in that dtype (every other parameter stays float32).
LOW_PRECISION_SCOPES = (("semantic_encoder", "encoder", "blocks"),
                        ("dasheng_tokenizer", "decoder", "backbone"),
                        ("dasheng_tokenizer", "decoder", "head"))


def semantic_block(config: SemanticEncoderConfig, dtype=None,
                   max_rows: int | None = None) -> TransformerBlock:
    """One layer of the semantic encoder's transformer; `max_rows`: its MLP runs on at most that
    many rows at a time (`_layers.in_row_blocks`), with the same parameters and results."""
    return TransformerBlock(config.num_heads, config.mlp_dim, config.qkv_bias, config.init_values,
                            dtype, max_rows)


def decoder_block(config: LosatokConfig, dtype=None, max_rows: int | None = None,
                  same_padding: bool = True) -> ConvNeXtBlock:
    """One ConvNeXt layer of the Vocos backbone; `max_rows` as for `semantic_block`."""
    return ConvNeXtBlock(config.decoder_intermediate_size, 1.0 / config.decoder_depth, dtype,
                         max_rows, same_padding)


def stacked(block: nn.Module, depth: int) -> nn.Module:
    """`block` applied `depth` times: an `nn.scan` over parameters stacked on a leading axis, its
    second argument (a mask) broadcast to every layer. Compile time does not grow with depth."""
    fields = {f.name: getattr(block, f.name) for f in dataclasses.fields(block)
              if f.init and f.name not in ("parent", "name")}
    return nn.scan(type(block), variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=depth)(**fields)


# Each stack of layers: where its parameters are, and its single layer's builder (config, dtype,
# max_rows). Under jit the stacks run as `stacked` scans; a caller holding each layer's weights as
# separate arrays can instead run one jitted layer per weight set (`runners.Runner` does on CPU).
LAYER_STACKS = {
    "semantic": (("semantic_encoder", "encoder", "blocks"),
                 lambda config, dtype=None, max_rows=None: semantic_block(config.semantic, dtype,
                                                                          max_rows)),
    "decoder": (("dasheng_tokenizer", "decoder", "backbone", "convnext"), decoder_block),
}


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm over the last axis with its running statistics as parameters."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        mean = self.param("mean", nn.initializers.zeros, (width,))
        var = self.param("var", nn.initializers.ones, (width,))
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


def patchify(spectrogram, frames_per_token: int):
    """(B, F, bins) -> (B, F // frames_per_token, frames_per_token · bins), trailing frames dropped.

    Patches are flattened frame-major, (frames, bins), so this is a plain reshape; upstream's
    (bins x frames) patch conv becomes a Linear over these vectors.
    """
    batch, frames, bins = spectrogram.shape
    tokens = frames // frames_per_token
    return spectrogram[:, :tokens * frames_per_token].reshape(batch, tokens, frames_per_token * bins)


class PatchEmbed(nn.Module):
    width: int
    frames_per_token: int

    @nn.compact
    def __call__(self, spectrogram):  # (B, F, bins) -> (B, T, width)
        return Linear(self.width, name="proj")(patchify(spectrogram, self.frames_per_token))


class AudioTransformer(nn.Module):
    """MiDashengLM's audio encoder: BatchNorm, patch embedding, chunked transformer, final norm.

    Tokens are cut into chunks of `chunk_tokens`; each chunk restarts the time positions and
    attends only within itself. All chunks run as one batch; `token_mask` (B, T) keeps padding
    (a short last chunk, or a clip shorter than its batch) out of every real token's attention.
    It runs in three stages, `stem` (log-mel to chunks), `blocks` and `finish`, so that a caller
    holding per-layer weights can run the blocks one layer at a time (see `LAYER_STACKS`).
    """

    config: SemanticEncoderConfig
    dtype: Any = None  # of the transformer blocks; the residual stream stays float32

    def setup(self):
        c = self.config
        self.init_bn = FrozenBatchNorm()
        self.patch_embed = PatchEmbed(c.embed_dim, c.frames_per_token)
        init = nn.initializers.normal(0.02)
        self.time_pos_embed = self.param("time_pos_embed", init, (c.chunk_tokens, c.embed_dim))
        self.freq_pos_embed = self.param("freq_pos_embed", init, (c.embed_dim,))
        self.blocks = stacked(semantic_block(c, self.dtype), c.depth)
        self.norm = layer_norm(1e-6)

    def stem(self, log_mel, token_mask):
        """(B, F, n_mels), (B, T) -> chunks (B · num_chunks, L, E) with positions added, and
        their mask (B · num_chunks, L)."""
        c = self.config
        x = self.patch_embed(self.init_bn(log_mel))
        batch, num_tokens, width = x.shape
        chunk = min(c.chunk_tokens, num_tokens)
        num_chunks = math.ceil(num_tokens / chunk)
        pad = num_chunks * chunk - num_tokens
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(batch * num_chunks, chunk, width)
        mask = jnp.pad(token_mask, ((0, 0), (0, pad))).reshape(batch * num_chunks, chunk)
        return x + self.time_pos_embed[:chunk] + self.freq_pos_embed, mask

    def finish(self, chunks, num_tokens: int):
        """The blocks' output chunks -> (B, T, E) after the final norm."""
        x = self.norm(chunks)
        chunk, width = x.shape[1:]
        batch = x.shape[0] // math.ceil(num_tokens / chunk)
        return x.reshape(batch, -1, width)[:, :num_tokens]


class BottleneckMLP(nn.Module):
    """Linear -> GELU -> Linear; layers named "0" and "2" as in upstream's nn.Sequential."""

    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        return Linear(self.out_dim, name="2")(gelu(Linear(self.hidden_dim, name="0")(x)))


class SemBo(nn.Module):
    """Semantic bottleneck: E -> D for the latent; D -> E reconstruction only feeds the SemBo loss."""

    config: LosatokConfig

    def setup(self):
        c = self.config
        self.downsample = BottleneckMLP(c.sembo_hidden_dim, c.decoder_dim)
        self.upsample = BottleneckMLP(c.sembo_hidden_dim, c.embed_dim)


class SemanticEncoder(nn.Module):
    config: LosatokConfig
    dtype: Any = None

    def setup(self):
        self.encoder = AudioTransformer(self.config.semantic, self.dtype)
        self.bottleneck = SemBo(self.config)

    def sembo_recon(self, emb):
        return self.bottleneck.upsample(self.bottleneck.downsample(emb))


class AcousticEncoder(nn.Module):
    """128-band log-mel -> patch conv -> LayerNorm (eps 1e-5, unlike everything else)."""

    config: LosatokConfig

    @nn.compact
    def __call__(self, log_mel):  # (B, F, 128) -> (B, T, E)
        c = self.config
        x = Linear(c.embed_dim, name="patch_embed")(patchify(log_mel, c.frames_per_token))
        return layer_norm(1e-5, "norm")(x)


class ConvTranspose1d(nn.Module):
    """Kernel == stride transposed conv: each latent frame becomes `factor` decoder frames."""

    width: int
    factor: int

    @nn.compact
    def __call__(self, z):  # (B, T, D) -> (B, factor·T, width)
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                            (z.shape[-1], self.factor, self.width))
        bias = self.param("bias", nn.initializers.zeros, (self.width,))
        y = jnp.einsum("btd,dkc->btkc", z, kernel) + bias
        return y.reshape(z.shape[0], -1, self.width)


class VocosBackbone(nn.Module):
    """Embedding conv and norm (`stem`), ConvNeXt blocks (`convnext`), final norm (`finish`):
    stages for the same reason as `AudioTransformer`'s."""

    config: LosatokConfig
    dtype: Any = None  # of the convolutions and ConvNeXt blocks; the residual stream stays float32

    def setup(self):
        c = self.config
        half = DECODER_KERNEL // 2
        self.embed = nn.Conv(c.decoder_embed_dim, (DECODER_KERNEL,), padding=[(half, half)],
                             dtype=self.dtype)
        self.norm = layer_norm(1e-6)  # float32: the residual stream starts here
        self.convnext = stacked(decoder_block(c, self.dtype), c.decoder_depth)
        self.final_layer_norm = layer_norm(1e-6, dtype=self.dtype)

    def stem(self, x, keep):  # (B, F, E), (B, F, 1) -> (B, F, C)
        return self.norm(self.embed(x * keep))

    def finish(self, x):
        return self.final_layer_norm(x)


class ISTFTHead(nn.Module):
    config: LosatokConfig
    dtype: Any = None  # of the output projection, whose result is float32 in any case

    @nn.compact
    def __call__(self, x, keep):  # (B, F, C), (B, F, 1) -> (B, F · istft_hop)
        c = self.config
        bins = c.istft_n_fft // 2 + 1
        out = Linear(2 * bins, dtype=self.dtype, float32_output=True, name="out")(x)
        return spectral.istft_same(out[..., :bins], out[..., bins:], keep,
                                   n_fft=c.istft_n_fft, hop=c.istft_hop)


class VocosDecoder(nn.Module):
    config: LosatokConfig
    dtype: Any = None

    def setup(self):
        self.backbone = VocosBackbone(self.config, self.dtype)
        self.head = ISTFTHead(self.config, self.dtype)


class DashengTokenizer(nn.Module):
    """Upstream's acoustic half: the acoustic encoder and the latent-to-audio decoder."""

    config: LosatokConfig
    dtype: Any = None

    def setup(self):
        c = self.config
        self.encoder = AcousticEncoder(c)
        self.upsampler = ConvTranspose1d(c.embed_dim, c.upsample_tokens)
        self.decoder = VocosDecoder(c, self.dtype)


class AudioVAE(nn.Module):
    """The whole tokenizer. `encode` and `decode` are the inference entry points.

    `dtype` (None or "float32": the exact float32 model; "bfloat16") is the compute dtype of the
    layers under LOW_PRECISION_SCOPES; their parameters may be stored in it or in float32.
    """

    config: LosatokConfig
    dtype: Any = None

    def setup(self):
        c = self.config
        dtype = compute_dtype(self.dtype)
        self.semantic_encoder = SemanticEncoder(c, dtype)
        self.dasheng_tokenizer = DashengTokenizer(c, dtype)
        self.fc_a = Linear(c.decoder_dim)
        self.fc_mu = Linear(c.decoder_dim)
        self.fc_logvar = Linear(c.decoder_dim)

    def encode(self, audio, noise=None):
        """(B, N) clips, each N samples long -> the nine upstream features plus both log-mels
        (time-major). `noise` (B, T, D) standard normal draws sample
        z = mu + noise · exp(logvar / 2); None gives z = mu. (Clips of other lengths go through
        `encode_padded`, as `losatok_jax.encode` does.)
        """
        c = self.config
        padded = spectral.reflect_pad(audio, c.front_end_pad)
        return self.encode_padded(padded, 1 + audio.shape[1] // c.hop_length, None, noise)

    def _front_ends(self, padded, num_frames: int):
        """Power spectrograms of both branches from one buffer padded by `front_end_pad`."""
        c, s = self.config, self.config.semantic
        semantic = spectral.power_spectrogram(padded, n_fft=s.n_fft, hop=s.hop_length,
                                              num_frames=num_frames,
                                              offset=c.front_end_pad - s.n_fft // 2)
        acoustic = spectral.power_spectrogram(padded, n_fft=c.n_fft_acoustic, hop=c.hop_length,
                                              num_frames=num_frames,
                                              offset=c.front_end_pad - c.n_fft_acoustic // 2)
        semantic_db = spectral.power_to_db(semantic, spectral.mel_filterbank(
            s.n_fft, s.n_mels, s.sample_rate, s.f_min, s.f_max))
        acoustic_log_mel = spectral.log_magnitude_mel(acoustic, spectral.mel_filterbank(
            c.n_fft_acoustic, c.n_mels_patch, c.sample_rate, 0.0, c.sample_rate / 2))
        return semantic_db, acoustic_log_mel

    def semantic_peak_db(self, padded, num_frames: int, valid_frames):
        """Per-row peak of the semantic dB spectrogram over its real frames (B,): the first pass of
        windowed encoding, where the 120 dB floor must follow the whole clip's peak."""
        semantic_db, _ = self._front_ends(padded, num_frames)
        return spectral.peak_db(semantic_db, _frame_mask(valid_frames, semantic_db.shape[:2]))

    def encode_padded(self, padded, num_frames: int, valid_frames=None, noise=None, peak_db=None):
        """Encodes `num_frames` frames from a buffer already padded by `front_end_pad` samples.

        `valid_frames` (B,) counts each row's real frames; `peak_db` (B,), if given, is a peak
        from frames outside this buffer (other windows of the same clip) that the floor must obey.
        """
        stem = self.encode_stem(padded, num_frames, valid_frames, peak_db)
        chunks = self.run_stack("semantic", stem["chunks"], stem["chunk_mask"])
        return self.encode_finish(stem, chunks, noise)

    def encode_stem(self, padded, num_frames: int, valid_frames=None, peak_db=None):
        """`encode_padded` up to the semantic transformer blocks: both log-mels and the semantic
        encoder's input chunks with their mask."""
        c = self.config
        semantic_db, acoustic_log_mel = self._front_ends(padded, num_frames)
        frame_mask = _frame_mask(valid_frames, semantic_db.shape[:2])
        peak = spectral.peak_db(semantic_db, frame_mask)
        if peak_db is not None:
            peak = jnp.maximum(peak, peak_db)
        semantic_log_mel = spectral.floor_db(semantic_db, peak)
        num_tokens = num_frames // c.frames_per_token
        token_mask = frame_mask[:, c.frames_per_token - 1:num_tokens * c.frames_per_token:
                                c.frames_per_token]
        chunks, chunk_mask = self.semantic_encoder.encoder.stem(semantic_log_mel, token_mask)
        return {"chunks": chunks, "chunk_mask": chunk_mask,
                "semantic_log_mel": semantic_log_mel, "acoustic_log_mel": acoustic_log_mel}

    def encode_finish(self, stem, chunks, noise=None):
        """`encode_padded` after the semantic transformer blocks, whose output is `chunks`."""
        c = self.config
        acoustic_log_mel = stem["acoustic_log_mel"]
        num_tokens = acoustic_log_mel.shape[1] // c.frames_per_token
        semantic_emb = self.semantic_encoder.encoder.finish(chunks, num_tokens)
        semantic_emb_low = self.semantic_encoder.bottleneck.downsample(semantic_emb)
        acoustic_emb = self.dasheng_tokenizer.encoder(acoustic_log_mel)
        acoustic_emb_low = self.fc_a(acoustic_emb)
        unified_emb_low = acoustic_emb_low + semantic_emb_low
        mu = self.fc_mu(unified_emb_low)
        logvar = jnp.clip(self.fc_logvar(unified_emb_low), -c.logvar_clamp, c.logvar_clamp)
        z = mu if noise is None else mu + noise * jnp.exp(0.5 * logvar)
        return {
            "z": z, "mu": mu, "logvar": logvar,
            "semantic_emb": semantic_emb, "acoustic_emb": acoustic_emb,
            "unified_emb": semantic_emb + acoustic_emb,
            "semantic_emb_low": semantic_emb_low, "acoustic_emb_low": acoustic_emb_low,
            "unified_emb_low": unified_emb_low,
            "semantic_log_mel": stem["semantic_log_mel"], "acoustic_log_mel": acoustic_log_mel,
        }

    def decode(self, z, num_tokens=None):
        """(B, T, D) -> (B, samples_per_token · T); row b's tokens past `num_tokens[b]` are absent:
        its audio equals decoding its first num_tokens[b] latents alone (then zeros)."""
        x, keep = self.decode_stem(z, _frame_mask(num_tokens, z.shape[:2]))
        return self.decode_finish(self.run_stack("decoder", x, keep), keep)

    def decode_stem(self, z, token_mask):
        """`decode` up to the ConvNeXt blocks: their input (B, F, C) and the frame mask `keep`
        (B, F, 1) that every later stage takes. `token_mask` (B, T) marks the real latents; runs
        of them at least `_batching.decoder_gap` masked latents apart decode as separate
        sequences."""
        keep = jnp.repeat(token_mask, self.config.upsample_tokens, axis=1)[..., None]
        keep = keep.astype(z.dtype)
        tokenizer = self.dasheng_tokenizer
        return tokenizer.decoder.backbone.stem(tokenizer.upsampler(z), keep), keep

    def decode_finish(self, x, keep):
        """`decode` after the ConvNeXt blocks, whose output is `x`."""
        decoder = self.dasheng_tokenizer.decoder
        return decoder.head(decoder.backbone.finish(x), keep)

    def run_stack(self, name: str, x, mask):
        """All layers of the `LAYER_STACKS` entry `name`, as one scan (the stack's parameter
        scope is also the attribute path of its scanned module)."""
        module = self
        for attribute in LAYER_STACKS[name][0]:
            module = getattr(module, attribute)
        return module(x, mask)[0]

    def sembo_recon(self, semantic_emb):
        return self.semantic_encoder.sembo_recon(semantic_emb)

    def __call__(self, audio):
        """Touches every parameter once; used only by `init`."""
        features = self.encode(audio)
        self.sembo_recon(features["semantic_emb"])
        return self.decode(features["z"])


def _frame_mask(counts, shape):
    """(B,) counts -> (B, L) bool mask of the first counts[b] positions; None means all."""
    if counts is None:
        return jnp.ones(shape, bool)
    return jnp.arange(shape[1])[None, :] < counts[:, None]
