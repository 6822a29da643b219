"""Training LoSATok with optax, as a library: the objective, the train state and a
data-parallel step over a device mesh, and crops of audio to train on. The command-line tool is
`losatok_jax.train`.

Upstream released no training code. The objective here is its latent losses (KL, semantic
distillation) plus waveform losses for the decoder (multi-resolution log-mel L1 and STFT loss) on
decode(z), z sampled with the reparameterisation. The semantic encoder is always frozen: its
parameters get no gradients and no optimizer state (so SemBo's own loss, a function of frozen
parameters only, is not part of the objective). The model is applied through `Losatok.apply`, as
at inference: float32 matmuls at full float32 precision on every backend (no TF32 on a GPU).
Batches, crops and sampling noise are functions of (seed, step), so a resumed run reproduces the
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Sequence

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from losatok_jax import audio_io, losses
from losatok_jax._layers import MATRIX_PARAMS
from losatok_jax.config import ConfigError, LosatokConfig
from losatok_jax.errors import LosatokError
from losatok_jax.model import Losatok
from losatok_jax.runners import DATA_AXIS

# Parameter subtrees (paths in the Losatok params tree) that each trainable group owns. Everything
# not selected, and always the semantic encoder, is frozen.
TRAINABLE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "vae_head": (("fc_a",), ("fc_mu",), ("fc_logvar",)),
    "acoustic_encoder": (("dasheng_tokenizer", "encoder"),),
    "decoder": (("dasheng_tokenizer", "upsampler"), ("dasheng_tokenizer", "decoder")),
}


def _check_range(name: str, value: float, *, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
    """A finite hyperparameter within [low, high] (or (low, high] with `low_open`)."""
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise LosatokError(f"{name} must be finite and in {bound}; got {value}")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the objective's terms. Waveform terms dominate by default; KL only regularises
    (upstream's own weights are unpublished)."""

    kl: float = 1e-3
    semantic: float = 1.0
    mel: float = 1.0
    stft: float = 1.0
    logvar: float = 0.0
    semantic_mode: str = "both"

    def __post_init__(self):
        if self.semantic_mode not in losses.SEMANTIC_MODES:
            raise LosatokError(f"semantic_mode must be one of {losses.SEMANTIC_MODES}; "
                             f"got {self.semantic_mode!r}")
        for name in ("kl", "semantic", "mel", "stft", "logvar"):
            _check_range(f"the {name} weight", getattr(self, name), low=0.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters. AdamW with linear warmup then cosine decay to
    `final_lr_ratio · learning_rate` at `steps`; weight decay only on linear weights and
    convolution kernels."""

    steps: int = 10000
    learning_rate: float = 1e-4
    warmup_steps: int = 500
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    max_grad_norm: float = 1.0
    trainable: tuple[str, ...] = tuple(TRAINABLE_GROUPS)
    weights: LossWeights = LossWeights()

    def __post_init__(self):
        unknown = sorted(set(self.trainable) - set(TRAINABLE_GROUPS))
        if unknown or not self.trainable:
            raise LosatokError(f"trainable must be a non-empty subset of {tuple(TRAINABLE_GROUPS)}; "
                             f"got {self.trainable}")
        if self.steps < 1:
            raise LosatokError(f"steps must be at least 1; got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise LosatokError(f"warmup_steps must be in [0, steps); got {self.warmup_steps} "
                             f"with steps {self.steps}")
        _check_range("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_range("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        _check_range("final_lr_ratio", self.final_lr_ratio, low=0.0, high=1.0)
        for name in ("b1", "b2"):
            _check_range(name, getattr(self, name), low=0.0, high=1.0)



def _is_trainable(path: tuple[str, ...], trainable: Sequence[str]) -> bool:
    return any(path[:len(prefix)] == prefix
               for group in trainable for prefix in TRAINABLE_GROUPS[group])


def split_params(params, trainable: Sequence[str]) -> tuple[dict, dict]:
    """Splits a Losatok params tree into (trainable, frozen) nested dicts of the same layout."""
    flat = flax.traverse_util.flatten_dict(params)
    selected = {path: leaf for path, leaf in flat.items() if _is_trainable(path, trainable)}
    frozen = {path: leaf for path, leaf in flat.items() if path not in selected}
    return (flax.traverse_util.unflatten_dict(selected),
            flax.traverse_util.unflatten_dict(frozen))


def merge_params(trainable, frozen) -> dict:
    """Inverse of `split_params`."""
    return flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(frozen),
                                              **flax.traverse_util.flatten_dict(trainable)})


def learning_rate_schedule(train_config: TrainConfig) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0, then cosine decay."""
    c = train_config
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if c.warmup_steps else c.learning_rate, peak_value=c.learning_rate,
        warmup_steps=c.warmup_steps, decay_steps=c.steps,
        end_value=c.learning_rate * c.final_lr_ratio)


def make_optimizer(train_config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; no weight decay on biases, norms and gains."""
    c = train_config

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) in MATRIX_PARAMS, params)

    return optax.chain(
        optax.clip_by_global_norm(c.max_grad_norm),
        optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                    mask=decay_mask))


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: the trainable parameters, their optimizer state, the number of
    completed steps and the base PRNG key (raw uint32 key data, so Orbax stores it as an array)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(model: Losatok, train_config: TrainConfig,
                     seed: int) -> tuple[TrainState, dict]:
    """(state, frozen params) for fine-tuning `model`; the optimizer sees only trainable leaves.

    The trainable leaves are float32 copies: train steps donate the state, which must not delete
    the arrays of `model` itself, and updates need float32 master weights whatever the storage
    dtype of `model`.
    """
    trainable, frozen = split_params(model.params, train_config.trainable)
    trainable = jax.tree.map(lambda leaf: jnp.array(leaf, jnp.float32), trainable)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                       opt_state=make_optimizer(train_config).init(trainable),
                       rng=jax.random.key_data(jax.random.key(seed)))
    return state, frozen


def training_loss(trainable, frozen, audio: jax.Array, noise_keys: jax.Array, *,
                  config: LosatokConfig, weights: LossWeights):
    """The objective on a batch of equal-length crops (B, N): (loss, its terms).

    z = mu + eps · exp(logvar / 2) with eps drawn from each example's own key (`noise_keys`, (B,)
    typed keys), so an example's noise does not depend on how the batch is split. Computes in
    float32.
    """
    model = Losatok(merge_params(trainable, frozen), config)
    num_tokens = config.num_tokens(audio.shape[1])
    noise = jax.vmap(lambda key: jax.random.normal(key, (num_tokens, config.decoder_dim)))(
        noise_keys)
    features = model.apply(audio, noise, method="encode")
    recon = model.apply(features["z"], method="decode")
    length = min(recon.shape[1], audio.shape[1])
    recon, target = recon[:, :length], audio[:, :length]
    stft = losses.multi_resolution_stft_loss(recon, target)
    terms = {
        "kl": losses.kl_loss(features["mu"], features["logvar"], config.exp_kl_clamp),
        "semantic": losses.semantic_loss(features, weights.semantic_mode),
        "mel": losses.multi_resolution_mel_loss(recon, target, config.sample_rate),
        "stft_sc": stft["spectral_convergence"],
        "stft_mag": stft["log_magnitude"],
    }
    loss = (weights.kl * terms["kl"] + weights.semantic * terms["semantic"]
            + weights.mel * terms["mel"] + weights.stft * stft["total_loss"])
    if weights.logvar:
        terms["logvar"] = losses.logvar_loss(features["logvar"])
        loss = loss + weights.logvar * terms["logvar"]
    return loss, {"loss": loss, **terms}


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all) with axis `DATA_AXIS`."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Places a copy of `tree` on every device of `mesh` (parameters, optimizer state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(audio: np.ndarray, grad_accum: int, mesh: Mesh) -> jax.Array:
    """(B, N) crops -> (grad_accum, B // grad_accum, N) micro-batches, each split across the mesh.

    Micro-batch k holds rows k·M .. k·M + M − 1 (M = B // grad_accum), the order `make_train_step`
    keys the sampling noise by.
    """
    batch, length = audio.shape
    micro = batch // grad_accum
    if micro * grad_accum != batch or micro % mesh.size:
        raise LosatokError(f"batch size {batch} must split into {grad_accum} micro-batches whose "
                         f"size is a multiple of the {mesh.size} devices")
    return jax.device_put(audio.reshape(grad_accum, micro, length),
                          NamedSharding(mesh, P(None, DATA_AXIS)))


@functools.lru_cache(maxsize=8)
def make_train_step(config: LosatokConfig, train_config: TrainConfig, mesh: Mesh):
    """A jitted `step(state, frozen, batch) -> (state, metrics)` for `shard_batch` batches.

    Gradients are averaged over the micro-batches (a scan, so memory is one micro-batch's) and,
    under jit's sharding propagation, across the devices of `mesh`; parameters, optimizer state
    and metrics are replicated. `state` is donated. Cached, so that runs repeated in one process
    (a notebook, a resumed run) compile once.
    """
    optimizer = make_optimizer(train_config)
    schedule = learning_rate_schedule(train_config)
    grad_fn = jax.value_and_grad(
        functools.partial(training_loss, config=config, weights=train_config.weights),
        has_aux=True)

    def step(state: TrainState, frozen, batch):
        accum, micro = batch.shape[:2]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro_step(index, audio):
            keys = jax.vmap(jax.random.fold_in, (None, 0))(
                step_key, index * micro + jnp.arange(micro))
            (_, terms), grads = grad_fn(state.params, frozen, audio, keys)
            return grads, terms

        def accumulate(total, inputs):
            return jax.tree.map(jnp.add, total, micro_step(*inputs)), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(micro_step, 0, batch[0]))
        (grads, terms), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), batch))
        grads, terms = jax.tree.map(lambda x: x / accum, (grads, terms))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = {**terms, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        new_state = state.replace(step=state.step + 1,
                                  params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, metrics

    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, DATA_AXIS))
    return jax.jit(step, in_shardings=(replicated, replicated, batched),
                   out_shardings=(replicated, replicated), donate_argnums=0)


class DataError(LosatokError):
    """Training data that cannot be used: nothing readable."""


def load_clips(paths: Sequence[str | Path], sample_rate: int) -> tuple[list[np.ndarray], list[str]]:
    """Decodes every file once (mono, `sample_rate`); returns (clips, messages for the skipped)."""
    clips, skipped = [], []
    for path in paths:
        try:
            clips.append(audio_io.load_audio(path, sample_rate))
        except audio_io.AudioReadError as e:
            skipped.append(str(e))
    return clips, skipped


class CropSampler:
    """Random fixed-length crops, a pure function of (seed, step).

    Example i of step s is the (s·B + i)-th draw of an endless sequence of epochs, each a seeded
    permutation of the clips; its crop offset is seeded by the same index. Clips shorter than a
    crop are zero-padded at the end.
    """

    def __init__(self, clips: Sequence[np.ndarray], segment_samples: int, batch_size: int,
                 seed: int):
        self.clips, self.segment_samples = list(clips), segment_samples
        self.batch_size, self.seed = batch_size, seed
        self._epoch, self._order = -1, np.arange(0)  # the current epoch's permutation

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, 0, epoch))
            self._epoch, self._order = epoch, rng.permutation(len(self.clips))
        return self._order

    def batch(self, step: int) -> np.ndarray:
        """The crops (batch_size, segment_samples) for step `step` (0-based)."""
        out = np.zeros((self.batch_size, self.segment_samples), np.float32)
        for row in range(self.batch_size):
            draw = step * self.batch_size + row
            epoch, position = divmod(draw, len(self.clips))
            clip = self.clips[self._epoch_order(epoch)[position]]
            spare = max(0, len(clip) - self.segment_samples)
            offset = np.random.default_rng((self.seed, 1, draw)).integers(spare + 1)
            piece = clip[offset:offset + self.segment_samples]
            out[row, :len(piece)] = piece
        return out


def segment_samples(seconds: float, config: LosatokConfig) -> int:
    """Crop length: `seconds` in whole latent frames, so that decode(encode(x)) is as long as x."""
    hop = config.samples_per_token
    samples = max(1, round(seconds * config.sample_rate / hop)) * hop
    longest_fft = max(r[0] for r in losses.STFT_RESOLUTIONS + losses.MEL_RESOLUTIONS)
    if samples <= longest_fft // 2:
        shortest = math.ceil((longest_fft // 2 + 1) / hop) * hop / config.sample_rate
        raise ConfigError(f"--segment_seconds {seconds} is too short; the waveform losses need "
                          f"at least {shortest} s")
    return samples
