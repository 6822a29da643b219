"""Independent PyTorch reference for LoSATok, written from the architecture description alone
(docs/architecture.md), not from the port.

The JAX port is tested against this oracle on configurations the golden vectors do not
cover (random weights, LayerScale, no qkv bias, other lengths). It runs in float64 by
default so that its own rounding is negligible next to the port's float32 error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

__all__ = [
    "SAMPLE_RATE",
    "HOP",
    "ISTFT_HOP",
    "ACOUSTIC_WINDOW_KEY",
    "ACOUSTIC_FB_KEY",
    "ISTFT_WINDOW_KEY",
    "hann_window",
    "mel_filterbank",
    "random_state_dict",
    "TorchOracle",
    "load_state_dict",
    "golden_num_heads",
    "golden_oracle",
]

SAMPLE_RATE = 16000
HOP = 160  # both front ends
ISTFT_HOP = 320
PATCH_FRAMES = 4
SEMANTIC_N_FFT = 512
ACOUSTIC_N_FFT = 1024
SEMANTIC_TOP_DB = 120.0

_SEM = "semantic_encoder.encoder."
_BOTTLENECK = "semantic_encoder.bottleneck."
_AC = "dasheng_tokenizer.encoder."
_DEC = "dasheng_tokenizer.decoder."
ACOUSTIC_WINDOW_KEY = _AC + "front_end.mel_spec.spectrogram.window"
ACOUSTIC_FB_KEY = _AC + "front_end.mel_spec.mel_scale.fb"
ISTFT_WINDOW_KEY = _DEC + "head.istft.window"


# ---------------------------------------------------------------------------
# Front-end constants (recomputed, never trusted from a checkpoint)
# ---------------------------------------------------------------------------

def hann_window(n: int, dtype=torch.float64) -> torch.Tensor:
    """Periodic Hann window: 0.5 - 0.5 cos(2 pi k / n), k = 0..n-1 (not symmetric)."""
    k = torch.arange(n, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2.0 * math.pi * k / n)).to(dtype)


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: float = 8000.0) -> torch.Tensor:
    """HTK triangular filterbank (n_fft//2+1, n_mels), float32, no area normalisation.

    Bin centres are linspace(0, sample_rate/2); band edges are equally spaced in HTK mel
    between f_min and f_max; each filter is min(rising, falling) slope clipped at 0.
    Built in float32 arithmetic on purpose: that is how the upstream buffers were made,
    and a float64 build differs from them by up to 1.3e-5 (cancellation near 8 kHz).
    """
    bin_hz = torch.linspace(0.0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float32)
    edge_mels = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2,
                               dtype=torch.float32)
    edges_hz = 700.0 * (10.0 ** (edge_mels / 2595.0) - 1.0)
    widths = edges_hz[1:] - edges_hz[:-1]
    offsets = edges_hz[None, :] - bin_hz[:, None]  # (bins, n_mels+2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


# ---------------------------------------------------------------------------
# Random upstream-layout state dict
# ---------------------------------------------------------------------------

def random_state_dict(*, embed_dim: int, depth: int, target_length: int, decoder_dim: int,
                      decoder_embed_dim: int, decoder_intermediate_size: int,
                      decoder_depth: int, sembo_hidden: int = 512, layer_scale: bool = False,
                      qkv_bias: bool = True, n_mels: int = 64, n_mels_acoustic: int = 128,
                      istft_n_fft: int = 1280, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full upstream AudioVAE state dict with random, well-conditioned float32 weights.

    Scales keep every stage O(1): linear/conv weights ~ N(0, 1/fan_in), norm weights near 1,
    BatchNorm statistics matched to typical dB log-mels, and a negative log-magnitude bias
    so the ISTFT magnitudes stay well below the clip at 100.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def normal(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(*shape, low, high):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    def weight(prefix, shape, fan_in):
        sd[prefix + "weight"] = normal(*shape, std=fan_in ** -0.5)

    def bias(prefix, n):
        sd[prefix + "bias"] = normal(n, std=0.05)

    def linear(prefix, n_in, n_out, with_bias=True):
        weight(prefix, (n_out, n_in), n_in)
        if with_bias:
            bias(prefix, n_out)

    def norm(prefix, n):
        sd[prefix + "weight"] = normal(n, mean=1.0, std=0.1)
        bias(prefix, n)

    E, D, C, I = embed_dim, decoder_dim, decoder_embed_dim, decoder_intermediate_size

    # Acoustic encoder, upsampler, Vocos decoder.
    sd[ACOUSTIC_WINDOW_KEY] = hann_window(ACOUSTIC_N_FFT)
    sd[ACOUSTIC_FB_KEY] = mel_filterbank(ACOUSTIC_N_FFT, n_mels_acoustic)
    weight(_AC + "patch_embed.", (E, 1, n_mels_acoustic, PATCH_FRAMES),
           n_mels_acoustic * PATCH_FRAMES)
    bias(_AC + "patch_embed.", E)
    norm(_AC + "norm.", E)
    weight("dasheng_tokenizer.upsampler.", (D, E, 2), D)
    bias("dasheng_tokenizer.upsampler.", E)
    backbone = _DEC + "backbone."
    weight(backbone + "embed.", (C, E, 7), E * 7)
    bias(backbone + "embed.", C)
    norm(backbone + "norm.", C)
    for i in range(decoder_depth):
        block = f"{backbone}convnext.{i}."
        sd[block + "gamma"] = uniform(C, low=0.1, high=0.5)
        weight(block + "dwconv.", (C, 1, 7), 7)
        bias(block + "dwconv.", C)
        norm(block + "norm.", C)
        linear(block + "pwconv1.", C, I)
        linear(block + "pwconv2.", I, C)
    norm(backbone + "final_layer_norm.", C)
    n_bins = istft_n_fft // 2 + 1
    linear(_DEC + "head.out.", C, 2 * n_bins)
    sd[_DEC + "head.out.bias"][:n_bins] -= 1.0  # log-magnitude ~ N(-1, 1): far below log(100)
    sd[ISTFT_WINDOW_KEY] = hann_window(istft_n_fft)

    # Semantic (Dasheng) encoder.
    sd[_SEM + "time_pos_embed"] = normal(1, E, 1, target_length // PATCH_FRAMES, std=0.1)
    sd[_SEM + "freq_pos_embed"] = normal(1, E, 1, 1, std=0.1)
    norm(_SEM + "init_bn.", n_mels)
    sd[_SEM + "init_bn.running_mean"] = normal(n_mels, mean=-30.0, std=10.0)
    sd[_SEM + "init_bn.running_var"] = uniform(n_mels, low=300.0, high=350.0)
    sd[_SEM + "init_bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    weight(_SEM + "patch_embed.proj.", (E, 1, n_mels, PATCH_FRAMES), n_mels * PATCH_FRAMES)
    bias(_SEM + "patch_embed.proj.", E)
    for i in range(depth):
        block = f"{_SEM}blocks.{i}."
        norm(block + "norm1.", E)
        linear(block + "attn.qkv.", E, 3 * E, with_bias=qkv_bias)
        linear(block + "attn.proj.", E, E)
        if layer_scale:
            sd[block + "ls1.gamma"] = uniform(E, low=0.1, high=1.0)
        norm(block + "norm2.", E)
        linear(block + "mlp.fc1.", E, 4 * E)
        linear(block + "mlp.fc2.", 4 * E, E)
        if layer_scale:
            sd[block + "ls2.gamma"] = uniform(E, low=0.1, high=1.0)
    norm(_SEM + "norm.", E)
    linear(_BOTTLENECK + "downsample.0.", E, sembo_hidden)
    linear(_BOTTLENECK + "downsample.2.", sembo_hidden, D)
    linear(_BOTTLENECK + "upsample.0.", D, sembo_hidden)
    linear(_BOTTLENECK + "upsample.2.", sembo_hidden, E)

    # VAE head.
    linear("fc_a.", E, D)
    linear("fc_mu.", D, D)
    linear("fc_logvar.", D, D)

    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------

def _stft_frames(audio: torch.Tensor, n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """Centered STFT (reflect pad n_fft/2, edge sample excluded): complex (B, frames, bins)."""
    padded = F.pad(audio[:, None, :], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]
    frames = padded.unfold(-1, n_fft, HOP)  # (B, 1 + N // HOP, n_fft)
    return torch.fft.rfft(frames * window, dim=-1)


def _layer_norm(x, p, eps):
    return F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"], eps)


def _linear(x, p):
    return F.linear(x, p["weight"], p.get("bias"))


def _mlp(x, p, first, second):
    """Linear -> exact GELU -> Linear (SemBo and transformer MLPs)."""
    return _linear(F.gelu(_linear(x, p[first])), p[second])


class TorchOracle:
    """LoSATok inference (upstream `encode(sample=False)` / `decode`) on an upstream state dict.

    Every size is read off tensor shapes; only the number of attention heads is not
    recoverable from a checkpoint and must be given. Window and filterbank buffers are
    recomputed from the spec rather than taken from the checkpoint.
    """

    def __init__(self, state_dict, *, num_heads: int, dtype=torch.float64):
        self.dtype = dtype
        self.num_heads = num_heads
        self.params = {k: v.to(dtype) for k, v in state_dict.items() if v.is_floating_point()}
        p = self.params
        self.embed_dim = p[_SEM + "norm.weight"].shape[0]
        if self.embed_dim % num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by {num_heads} heads")
        self.chunk_tokens = p[_SEM + "time_pos_embed"].shape[-1]
        self.depth = 1 + max(int(k.split(".")[3]) for k in p if k.startswith(_SEM + "blocks."))
        self.decoder_depth = 1 + max(
            (int(k.split(".")[4]) for k in p if k.startswith(_DEC + "backbone.convnext.")),
            default=-1)
        self.n_mels = p[_SEM + "patch_embed.proj.weight"].shape[2]
        self.n_mels_acoustic = p[_AC + "patch_embed.weight"].shape[2]
        self.istft_n_fft = p[_DEC + "head.out.weight"].shape[0] - 2
        self.semantic_window = hann_window(SEMANTIC_N_FFT, dtype)
        self.semantic_fb = mel_filterbank(SEMANTIC_N_FFT, self.n_mels).to(dtype)
        self.acoustic_window = hann_window(ACOUSTIC_N_FFT, dtype)
        self.acoustic_fb = mel_filterbank(ACOUSTIC_N_FFT, self.n_mels_acoustic).to(dtype)
        self.istft_window = hann_window(self.istft_n_fft, dtype)

    def _group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Sub-dict of tensors under `prefix`, keyed by the remaining name."""
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def _sub(self, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        """Two-level view: {'norm1': {'weight': ..., 'bias': ...}, ...} under `prefix`."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in self._group(prefix).items():
            module, _, leaf = k.rpartition(".")
            out.setdefault(module, {})[leaf] = v
        return out

    # -- front ends ---------------------------------------------------------

    def _check_audio(self, audio) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(audio), dtype=self.dtype)
        if x.ndim != 2:
            raise ValueError(f"audio must be (B, N), got shape {tuple(x.shape)}")
        if x.shape[1] <= ACOUSTIC_N_FFT // 2:
            raise ValueError(f"need more than {ACOUSTIC_N_FFT // 2} samples, got {x.shape[1]}")
        return x

    def _semantic_logmel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, F) power log-mel in dB, floored 120 dB below each example's max."""
        power = _stft_frames(audio, SEMANTIC_N_FFT, self.semantic_window).abs() ** 2
        db = 10.0 * torch.log10(torch.clamp(power @ self.semantic_fb, min=1e-10))
        floor = db.amax(dim=(1, 2), keepdim=True) - SEMANTIC_TOP_DB
        return torch.maximum(db, floor).transpose(1, 2)

    def _acoustic_logmel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, n_mels_acoustic, F) natural log of the magnitude mel spectrogram."""
        magnitude = _stft_frames(audio, ACOUSTIC_N_FFT, self.acoustic_window).abs()
        return torch.log(torch.clamp(magnitude @ self.acoustic_fb, min=1e-7)).transpose(1, 2)

    @staticmethod
    def _patchify(logmel: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Conv over full-height (bands x 4 frames) patches: (B, bands, F) -> (B, F//4, E)."""
        tokens = F.conv2d(logmel[:, None], p["weight"], p["bias"], stride=p["weight"].shape[2:])
        return tokens[:, :, 0].transpose(1, 2)

    # -- semantic encoder ---------------------------------------------------

    def _attention(self, x, p):
        B, T, E = x.shape
        head_dim = E // self.num_heads
        qkv = _linear(x, p["attn.qkv"]).reshape(B, T, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * head_dim ** -0.5, dim=-1)
        return _linear((weights @ v).transpose(1, 2).reshape(B, T, E), p["attn.proj"])

    def _block(self, x, p):
        """Pre-norm transformer block; LayerScale is identity when its gamma is absent."""
        ls1 = p["ls1"]["gamma"] if "ls1" in p else 1.0
        ls2 = p["ls2"]["gamma"] if "ls2" in p else 1.0
        x = x + ls1 * self._attention(_layer_norm(x, p["norm1"], 1e-6), p)
        return x + ls2 * _mlp(_layer_norm(x, p["norm2"], 1e-6), p, "mlp.fc1", "mlp.fc2")

    def _semantic_encoder(self, logmel: torch.Tensor) -> torch.Tensor:
        """Dasheng encoder: BatchNorm, patch embed, then independent chunks -> (B, T, E)."""
        bn = self._group(_SEM + "init_bn.")
        x = (logmel - bn["running_mean"][:, None]) / torch.sqrt(bn["running_var"][:, None] + 1e-5)
        x = x * bn["weight"][:, None] + bn["bias"][:, None]
        tokens = self._patchify(x, self._group(_SEM + "patch_embed.proj."))
        time_pos = self.params[_SEM + "time_pos_embed"][0, :, 0].T  # (chunk_tokens, E)
        freq_pos = self.params[_SEM + "freq_pos_embed"].reshape(1, 1, -1)
        final_norm = self._group(_SEM + "norm.")
        blocks = [self._sub(f"{_SEM}blocks.{i}.") for i in range(self.depth)]
        outputs = []
        for chunk in tokens.split(self.chunk_tokens, dim=1):
            h = chunk + time_pos[: chunk.shape[1]] + freq_pos
            for block in blocks:
                h = self._block(h, block)
            outputs.append(_layer_norm(h, final_norm, 1e-6))
        return torch.cat(outputs, dim=1)

    def _sembo_down(self, emb):
        return _mlp(emb, self._sub(_BOTTLENECK + "downsample."), "0", "2")

    def _sembo_up(self, emb_low):
        return _mlp(emb_low, self._sub(_BOTTLENECK + "upsample."), "0", "2")

    # -- public API ----------------------------------------------------------

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        """Deterministic encode (z = mu) plus front-end and encoder intermediates."""
        x = self._check_audio(audio)
        semantic_logmel = self._semantic_logmel(x)
        acoustic_logmel = self._acoustic_logmel(x)
        semantic_encoder_out = self._semantic_encoder(semantic_logmel)
        acoustic_tokens = self._patchify(acoustic_logmel, self._group(_AC + "patch_embed."))
        acoustic_emb = _layer_norm(acoustic_tokens, self._group(_AC + "norm."), 1e-5)

        T = min(semantic_encoder_out.shape[1], acoustic_emb.shape[1])
        semantic_emb = semantic_encoder_out[:, :T]
        acoustic_emb = acoustic_emb[:, :T]
        semantic_emb_low = self._sembo_down(semantic_emb)
        acoustic_emb_low = _linear(acoustic_emb, self._group("fc_a."))
        unified_emb_low = acoustic_emb_low + semantic_emb_low
        mu = _linear(unified_emb_low, self._group("fc_mu."))
        logvar = torch.clamp(_linear(unified_emb_low, self._group("fc_logvar.")), -20.0, 20.0)
        out = {
            "z": mu, "mu": mu, "logvar": logvar,
            "semantic_emb": semantic_emb, "acoustic_emb": acoustic_emb,
            "unified_emb": semantic_emb + acoustic_emb,
            "semantic_emb_low": semantic_emb_low, "acoustic_emb_low": acoustic_emb_low,
            "unified_emb_low": unified_emb_low,
            "semantic_logmel": semantic_logmel, "acoustic_logmel": acoustic_logmel,
            "semantic_encoder_out": semantic_encoder_out,
        }
        return {k: v.numpy() for k, v in out.items()}

    @torch.no_grad()
    def sembo_recon(self, semantic_emb: np.ndarray) -> np.ndarray:
        """SemBo round trip upsample(downsample(emb)): (B, T, E) -> (B, T, E)."""
        emb = torch.as_tensor(np.asarray(semantic_emb), dtype=self.dtype)
        return self._sembo_up(self._sembo_down(emb)).numpy()

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (B, T, D) -> audio (B, 640 T)."""
        z = torch.as_tensor(np.asarray(z), dtype=self.dtype)
        B, T, _ = z.shape
        up = self._group("dasheng_tokenizer.upsampler.")
        # ConvTranspose1d, kernel = stride = 2: frame 2t+k = z_t . W[:, :, k] + bias.
        x = torch.einsum("btd,dek->btke", z, up["weight"]).reshape(B, 2 * T, -1) + up["bias"]
        x = self._vocos_backbone(x)
        return self._istft_head(x).numpy()

    def _vocos_backbone(self, x):
        """Embed conv, LayerNorm, ConvNeXt blocks, final LayerNorm: (B, F, E) -> (B, F, C)."""
        p = self._sub(_DEC + "backbone.")
        x = F.conv1d(x.transpose(1, 2), p["embed"]["weight"], p["embed"]["bias"], padding=3)
        x = _layer_norm(x.transpose(1, 2), p["norm"], 1e-6)
        for i in range(self.decoder_depth):
            dwconv = p[f"convnext.{i}.dwconv"]
            h = F.conv1d(x.transpose(1, 2), dwconv["weight"], dwconv["bias"],
                         padding=3, groups=x.shape[-1]).transpose(1, 2)
            h = _layer_norm(h, p[f"convnext.{i}.norm"], 1e-6)
            h = _mlp(h, p, f"convnext.{i}.pwconv1", f"convnext.{i}.pwconv2")
            x = x + p[f"convnext.{i}"]["gamma"] * h
        return _layer_norm(x, p["final_layer_norm"], 1e-6)

    def _istft_head(self, x):
        """Linear -> (log-magnitude, phase) -> irfft, windowed overlap-add, 'same' trim."""
        n_fft, hop = self.istft_n_fft, ISTFT_HOP
        log_mag, phase = _linear(x, self._group(_DEC + "head.out.")).chunk(2, dim=-1)
        mag = torch.clamp(torch.exp(log_mag), max=100.0)
        frames = torch.fft.irfft(torch.polar(mag, phase), n=n_fft, dim=-1) * self.istft_window
        n_frames = frames.shape[1]
        length = (n_frames - 1) * hop + n_fft

        def overlap_add(columns):  # (B, n_fft, n_frames) -> (B, length)
            return F.fold(columns, output_size=(1, length), kernel_size=(1, n_fft),
                          stride=(1, hop))[:, 0, 0]

        audio = overlap_add(frames.transpose(1, 2))
        envelope = overlap_add((self.istft_window ** 2)[None, :, None].expand(1, n_fft, n_frames))
        pad = (n_fft - hop) // 2
        return audio[:, pad:length - pad] / envelope[:, pad:length - pad]


# ---------------------------------------------------------------------------
# Golden cases
# ---------------------------------------------------------------------------

def load_state_dict(path) -> dict[str, torch.Tensor]:
    """Checkpoint as saved by upstream: a bare state dict or {"state_dict": ...}."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj)


def golden_num_heads(case_dir) -> int:
    """Heads of the semantic encoder: `semantic_encoder_config.num_heads`, default 16."""
    config = yaml.safe_load((Path(case_dir) / "config.yml").read_text())
    return int((config.get("semantic_encoder_config") or {}).get("num_heads", 16))


def golden_oracle(case_dir, dtype=torch.float64) -> TorchOracle:
    """Oracle for a golden case folder (losatok.pth + config.yml)."""
    case_dir = Path(case_dir)
    return TorchOracle(load_state_dict(case_dir / "losatok.pth"),
                       num_heads=golden_num_heads(case_dir), dtype=dtype)
