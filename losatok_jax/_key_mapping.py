"""Upstream state-dict keys -> the Flax parameter tree, as one table of rules (numpy only).

The Flax tree mirrors upstream's module names, so a key keeps its path and only its leaf changes:
a linear layer's `weight` is copied as it is ((out, in), as `_layers.Linear` holds it), a
convolution's becomes `kernel` (re-laid out) and a norm's `scale`; per-layer keys of repeated
blocks are stacked on a leading axis, and buffers that are recomputed (windows, mel filterbanks)
are checked against our own computation and dropped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from losatok_jax import spectral
from losatok_jax.config import LosatokConfig


def _patch_conv(w):  # Conv2d (E, 1, bins, frames) -> Linear on frame-major patches (E, frames·bins)
    return w[:, 0].transpose(0, 2, 1).reshape(w.shape[0], -1)


def _conv1d(w):  # (out, in/groups, k) -> (k, in/groups, out)
    return w.transpose(2, 1, 0)


def _conv_transpose1d(w):  # (in, out, k) -> (in, k, out)
    return w.transpose(0, 2, 1)


def _time_pos(w):  # (1, E, 1, L) -> (L, E)
    return w[0, :, 0].T


def _same(w):
    return w


# (regex on the upstream key with the block index removed, Flax leaf path, re-layout). First match
# wins. `\1` is the module path, with "." turned into "/" afterwards.
RULES: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"(.*\.init_bn)\.weight", r"\1.scale", _same),
    (r"(.*\.init_bn)\.running_mean", r"\1.mean", _same),
    (r"(.*\.init_bn)\.running_var", r"\1.var", _same),
    (r"(.*)\.time_pos_embed", r"\1.time_pos_embed", _time_pos),
    (r"(.*)\.freq_pos_embed", r"\1.freq_pos_embed", np.ravel),
    (r"(.*\.patch_embed(?:\.proj)?)\.weight", r"\1.weight", _patch_conv),
    (r"(.*\.(?:embed|dwconv))\.weight", r"\1.kernel", _conv1d),
    (r"(.*\.upsampler)\.weight", r"\1.kernel", _conv_transpose1d),
    (r"(.*(?:norm|norm1|norm2|final_layer_norm))\.weight", r"\1.scale", _same),
    (r"(.*)\.(weight|bias|gamma)", r"\1.\2", _same),
)

# Repeated layers: upstream `<stack>.<i>.<rest>` becomes Flax `<stack>.<rest>` stacked over i.
_STACKED = re.compile(r"^(.*\.(?:blocks|convnext))\.(\d+)\.(.*)$")

# Buffers recomputed from the config; their stored values are checked, then dropped.
_ACOUSTIC_WINDOW = "dasheng_tokenizer.encoder.front_end.mel_spec.spectrogram.window"
_ACOUSTIC_FB = "dasheng_tokenizer.encoder.front_end.mel_spec.mel_scale.fb"
_ISTFT_WINDOW = "dasheng_tokenizer.decoder.head.istft.window"
_UNUSED = re.compile(r".*\.num_batches_tracked$")


class MappingError(ValueError):
    """The checkpoint does not fit the model: the message names every offending key."""


def _map_key(key: str) -> tuple[str, Callable, int | None]:
    """Upstream key -> (Flax path joined by "/", re-layout, layer index or None)."""
    layer = None
    stacked = _STACKED.match(key)
    if stacked:
        key, layer = f"{stacked.group(1)}.{stacked.group(3)}", int(stacked.group(2))
    for pattern, target, relayout in RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key).replace(".", "/"), relayout, layer
    raise MappingError(f"no rule maps key {key!r}")


def check_buffers(state: Mapping[str, np.ndarray], config: LosatokConfig,
                  atol: float = 1e-5) -> list[str]:
    """Compares stored windows and filterbanks with ours; returns a message per disagreement."""
    expected = {
        _ACOUSTIC_WINDOW: spectral.hann_window(config.n_fft_acoustic),
        _ACOUSTIC_FB: spectral.mel_filterbank(config.n_fft_acoustic, config.n_mels_patch,
                                              config.sample_rate, 0.0, config.sample_rate / 2),
        _ISTFT_WINDOW: spectral.hann_window(config.istft_n_fft),
    }
    problems = []
    for key, ours in expected.items():
        if key not in state:
            problems.append(f"missing buffer {key}")
        elif state[key].shape != ours.shape:
            problems.append(f"buffer {key} has shape {state[key].shape}, expected {ours.shape}")
        else:
            # A half-precision checkpoint (`model.to(torch.bfloat16)`) stores rounded buffers.
            error = min(np.max(np.abs(state[key] - ours.astype(dtype).astype(np.float32)))
                        for dtype in (np.float32, ml_dtypes.bfloat16, np.float16))
            if error > atol:
                problems.append(f"buffer {key} differs from the recomputed one by "
                                f"{error:.2e} (> {atol:g})")
    return problems


def is_buffer(key: str) -> bool:
    return key in (_ACOUSTIC_WINDOW, _ACOUSTIC_FB, _ISTFT_WINDOW) or bool(_UNUSED.match(key))


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One Flax parameter: the upstream keys it is built from (one, or one per stacked layer, in
    layer order) and the re-layout applied to each."""

    sources: tuple[str, ...]
    relayout: Callable[[np.ndarray], np.ndarray]
    stacked: bool

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The leaf's shape, from one source's shape, without reading any data."""
        layer = self.relayout(np.empty(source_shape, np.float32)).shape
        return (len(self.sources), *layer) if self.stacked else layer

    def build(self, read: Callable[[str], np.ndarray]) -> np.ndarray:
        """The leaf's float32 values; `read(key)` gives one source tensor as numpy."""
        def one(key):
            return np.ascontiguousarray(self.relayout(np.asarray(read(key), np.float32)))

        if not self.stacked:
            return one(self.sources[0])
        first = one(self.sources[0])
        out = np.empty((len(self.sources), *first.shape), np.float32)
        out[0] = first
        for i, key in enumerate(self.sources[1:], 1):
            out[i] = one(key)  # each layer is read, copied and dropped in turn
        return out


def plan(keys: Iterable[str]) -> dict[str, Leaf]:
    """Flat Flax paths ("a/b/kernel") -> how to build each from upstream keys; repeated layers
    are stacked on a leading axis."""
    leaves: dict[str, Leaf] = {}
    layers: dict[str, dict[int, str]] = {}
    relayouts: dict[str, Callable] = {}
    for key in keys:
        if is_buffer(key):
            continue
        path, relayout, layer = _map_key(key)
        if layer is None:
            leaves[path] = Leaf((key,), relayout, stacked=False)
        else:
            layers.setdefault(path, {})[layer] = key
            relayouts[path] = relayout
    for path, by_layer in layers.items():
        count = max(by_layer) + 1
        gaps = sorted(set(range(count)) - set(by_layer))
        if gaps:
            raise MappingError(f"{path}: layers {gaps} are missing")
        leaves[path] = Leaf(tuple(by_layer[i] for i in range(count)), relayouts[path], True)
    return leaves


def to_flax(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a float state dict to flat Flax paths ("a/b/kernel"), stacking repeated layers."""
    return {path: leaf.build(state.__getitem__) for path, leaf in plan(state).items()}


def _count_layers(state: Mapping[str, np.ndarray], stack: str) -> int:
    indices = {int(m.group(2)) for k in state if (m := _STACKED.match(k)) and m.group(1) == stack}
    return max(indices) + 1 if indices else 0


def infer_config(state: Mapping[str, np.ndarray], num_heads: int) -> dict[str, dict[str, object]]:
    """Reads what the tensors determine: {"tokenizer": {field: value}, "semantic": {...}}.

    The number of heads is not in the tensors; it is only used to spell the result.
    """
    enc = "semantic_encoder.encoder"
    shape = {k: tuple(v.shape) for k, v in state.items()}

    def need(key):
        if key not in shape:
            raise MappingError(f"missing key {key}")
        return shape[key]

    patch = need(f"{enc}.patch_embed.proj.weight")  # (E, 1, n_mels, frames)
    embed_dim = patch[0]
    semantic = {
        "embed_dim": embed_dim,
        "depth": _count_layers(state, f"{enc}.blocks"),
        "num_heads": num_heads,
        "n_mels": patch[2],
        "patch_size": (patch[2], patch[3]),
        "patch_stride": (patch[2], patch[3]),
        "target_length": need(f"{enc}.time_pos_embed")[-1] * patch[3],
        "mlp_ratio": need(f"{enc}.blocks.0.mlp.fc1.weight")[0] / embed_dim,
        "qkv_bias": f"{enc}.blocks.0.attn.qkv.bias" in shape,
        "layer_scale": f"{enc}.blocks.0.ls1.gamma" in shape,
    }
    tok = "dasheng_tokenizer"
    acoustic_patch = need(f"{tok}.encoder.patch_embed.weight")
    tokenizer = {
        "embed_dim": acoustic_patch[0],
        "n_mels_patch": acoustic_patch[2],
        "frames_per_token": acoustic_patch[3],
        "decoder_dim": need("fc_mu.weight")[0],
        "upsample_tokens": need(f"{tok}.upsampler.weight")[2],
        "decoder_embed_dim": need(f"{tok}.decoder.backbone.embed.weight")[0],
        "decoder_intermediate_size": need(f"{tok}.decoder.backbone.convnext.0.pwconv1.weight")[0],
        "decoder_depth": _count_layers(state, f"{tok}.decoder.backbone.convnext"),
        "istft_n_fft": need(f"{tok}.decoder.head.out.weight")[0] - 2,
        "sembo_hidden_dim": need("semantic_encoder.bottleneck.downsample.0.weight")[0],
    }
    return {"tokenizer": tokenizer, "semantic": semantic}


def config_disagreements(inferred: Mapping[str, Mapping[str, object]],
                         config: LosatokConfig) -> list[str]:
    """Each field where the tensors and the config disagree, as a readable message."""
    problems = []
    sections = (("tokenizer", config, ""), ("semantic", config.semantic, "semantic_encoder_config."))
    for section, values, prefix in sections:
        for field, found in inferred[section].items():
            expected = getattr(values, field)
            if isinstance(expected, tuple):
                found = tuple(found)
            if found != expected:
                problems.append(f"{prefix}{field}: checkpoint has {found!r}, config says {expected!r}")
    return problems
