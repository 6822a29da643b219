"""Train and fine-tune LoSATok with optax: the objective, a data-parallel train step, and a CLI.

    python -m losatok_jax.train --init_from ckpts/losatok_kl1e-2 --data wavs/ --output_dir runs/a \
        [--steps N] [--batch_size B] [--segment_seconds S] [--learning_rate LR] [--save_every K] \
        [--seed S] [--trainable vae_head acoustic_encoder decoder]

Upstream released no training code. The objective here is its latent losses (KL, semantic
distillation) plus waveform losses for the decoder (multi-resolution log-mel L1 and STFT loss) on
decode(z), z sampled with the reparameterisation. The semantic encoder is always frozen: its
parameters get no gradients and no optimizer state (so SemBo's own loss, a function of frozen
parameters only, is not part of the objective). Started again on the same output directory, the
CLI resumes from its latest checkpoint and reproduces the uninterrupted run: batches, crops and
sampling noise are functions of (seed, step), not of how many steps this process has run. Bad
input (missing checkpoint, no data, bad options) prints one `error: ...` line and exits with
status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from losatok_jax import _cli, _files, _model_source, audio_io, losses
from losatok_jax._layers import MATRIX_PARAMS
from losatok_jax._modules import AudioVAE
from losatok_jax.api import load_losatok
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
METRICS_FILE = "metrics.jsonl"
RUN_OPTIONS_FILE = "train_options.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"


def _check_range(name: str, value: float, *, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
    """A finite hyperparameter within [low, high] (or (low, high] with `low_open`)."""
    above = value > low if low_open else value >= low
    if not (math.isfinite(value) and above and value <= high):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be finite and in {bound}; got {value}")


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
            raise ValueError(f"semantic_mode must be one of {losses.SEMANTIC_MODES}; "
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
            raise ValueError(f"trainable must be a non-empty subset of {tuple(TRAINABLE_GROUPS)}; "
                             f"got {self.trainable}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1; got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps); got {self.warmup_steps} "
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
    module = AudioVAE(config)
    variables = {"params": merge_params(trainable, frozen)}
    num_tokens = config.num_tokens(audio.shape[1])
    noise = jax.vmap(lambda key: jax.random.normal(key, (num_tokens, config.decoder_dim)))(
        noise_keys)
    features = module.apply(variables, audio, noise, method="encode")
    recon = module.apply(variables, features["z"], method="decode")
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
        raise ValueError(f"batch size {batch} must split into {grad_accum} micro-batches whose "
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


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drops rows logged after the checkpoint a run resumes from (they will be logged again) and
    a last line torn by a crash."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if kept != lines:
        path.write_text("".join(kept))


class _Progress:
    """A progress bar redrawn in place, on a terminal only: logs get the step lines alone."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.began = total, start, time.monotonic()
        self.line = _cli.StatusLine(terminal_only=True)
        self.loss: float | None = None  # the last logged loss

    def update(self, done: int) -> None:
        filled = 30 * done // self.total
        rate = (done - self.start) / max(time.monotonic() - self.began, 1e-9)
        loss = "" if self.loss is None else f"loss {self.loss:.4f}  "
        self.line.show(f"{done}/{self.total} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{loss}{rate:.2f} step/s")

    def clear(self) -> None:
        self.line.clear()


def _parser() -> argparse.ArgumentParser:
    defaults, weights = TrainConfig(), LossWeights()
    parser = _cli.Parser("train", __doc__.split("\n\n")[0])
    required = functools.partial(parser.add_argument, required=True)

    def option(flag, help, **kwargs):
        parser.add_argument(flag, help=f"{help} (default: %(default)s)", **kwargs)

    required("--init_from", help=f"the model to start from: {_model_source.MODEL_HELP}")
    parser.add_argument("--config_path", default=None, help=_model_source.CONFIG_HELP)
    required("--data",
             help="folder of audio files (searched recursively) or a manifest with one path a line")
    required("--output_dir",
             help="run directory: checkpoints, metrics.jsonl, final/; an existing run resumes")
    option("--steps", "optimizer steps in all", type=int, default=defaults.steps)
    option("--batch_size", "crops per optimizer step, over all devices", type=int, default=16)
    option("--grad_accum", "micro-batches per step, each batch_size / grad_accum crops",
           type=int, default=1)
    option("--segment_seconds", "crop length, rounded to whole 40 ms latent frames",
           type=_cli.positive(float, "number of seconds"), default=2.0)
    option("--learning_rate", "peak learning rate", type=float, default=defaults.learning_rate)
    option("--warmup_steps", "linear warmup steps before the cosine decay; None: 5%% of --steps",
           type=int, default=None)
    option("--weight_decay", "AdamW weight decay, on weights and kernels only", type=float,
           default=defaults.weight_decay)
    option("--max_grad_norm", "clip gradients to this global norm", type=float,
           default=defaults.max_grad_norm)
    option("--trainable", "parameter groups to train; the semantic encoder is always frozen, and "
           "`--trainable decoder` keeps the latents unchanged", nargs="+",
           choices=tuple(TRAINABLE_GROUPS), default=list(defaults.trainable))
    option("--kl_weight", "weight of the KL term (clamped from below at the model's "
           "exp_kl_clamp)", type=float, default=weights.kl)
    option("--semantic_weight", "weight of the semantic distillation term", type=float,
           default=weights.semantic)
    option("--semantic_mode", "which embeddings the semantic term matches",
           choices=losses.SEMANTIC_MODES, default=weights.semantic_mode)
    option("--mel_weight", "weight of the multi-resolution log-mel L1 term", type=float,
           default=weights.mel)
    option("--stft_weight", "weight of the multi-resolution STFT term", type=float,
           default=weights.stft)
    option("--logvar_weight", "weight of upstream's optional logvar penalty", type=float,
           default=weights.logvar)
    option("--seed", "seeds data order, crops and sampling noise", type=_cli.seed,
           default=0)
    option("--save_every", "checkpoint every K steps", type=int, default=1000)
    option("--keep", "checkpoints to keep", type=int, default=3)
    option("--log_every", "log metrics every K steps", type=int, default=10)
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 20
    try:
        weights = LossWeights(kl=args.kl_weight, semantic=args.semantic_weight,
                              mel=args.mel_weight, stft=args.stft_weight,
                              logvar=args.logvar_weight, semantic_mode=args.semantic_mode)
        return TrainConfig(steps=args.steps, learning_rate=args.learning_rate,
                           warmup_steps=warmup, weight_decay=args.weight_decay,
                           max_grad_norm=args.max_grad_norm,
                           trainable=tuple(dict.fromkeys(args.trainable)), weights=weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _run_options(args: argparse.Namespace) -> dict:
    """The options a resumed run must share with the run it continues (all but bookkeeping)."""
    options = {k: v for k, v in vars(args).items()
               if k not in ("output_dir", "save_every", "keep", "log_every")}
    options["init_from"] = str(Path(args.init_from).absolute())
    options["data"] = str(Path(args.data).absolute())
    options["trainable"] = list(args.trainable)
    return options


def _has_saved_steps(run_dir: Path) -> bool:
    """Whether a run in `run_dir` saved a checkpoint (Orbax names step folders by number)."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def _check_resumable(run_dir: Path, options: dict) -> None:
    if not (run_dir / RUN_OPTIONS_FILE).exists():
        return  # nothing recorded to compare with
    recorded = json.loads((run_dir / RUN_OPTIONS_FILE).read_text())
    changed = [f"--{key} {recorded.get(key)!r} then, {value!r} now"
               for key, value in options.items() if recorded.get(key) != value]
    if changed:
        raise ConfigError(f"{run_dir} holds a run started with other options ("
                          + "; ".join(changed) + "); rerun with the same options to resume, or "
                          "choose a new --output_dir")


def _write_final(run_dir: Path, model: Losatok) -> Path:
    from losatok_jax import checkpoint

    final = run_dir / FINAL_DIR
    if final.exists() and not (final / checkpoint.CONFIG_FILE).exists():
        shutil.rmtree(final)  # an interrupted earlier write
    if not final.exists():
        checkpoint.save(final, model)
    return final


def _format(row: Mapping[str, float]) -> str:
    return "  ".join(f"{key} {value:.4g}" for key, value in row.items() if key != "step")


def _run(args: argparse.Namespace) -> int:
    import orbax.checkpoint as ocp

    for flag in ("steps", "batch_size", "grad_accum", "save_every", "keep", "log_every"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    train_config = _train_config(args)
    # Inputs, then the run folder (checked without creating it), then the slow work; nothing is
    # written before the data has been read.
    paths = [entry.path for entry in _cli.list_inputs(args.data)]
    _model_source.check_exists(args.init_from, "--init_from")
    _files.check_apart(args.output_dir, "--output_dir",
                       [("--init_from", args.init_from), ("--data", args.data)],
                       [] if Path(args.data).is_dir() else paths)
    _files.check_writable_folder(args.output_dir)
    model_path, config_path = _model_source.resolve(args.init_from, args.config_path)
    model = load_losatok(model_path, config_path=config_path)
    crop = segment_samples(args.segment_seconds, model.config)
    mesh = data_mesh()
    if args.batch_size % (args.grad_accum * mesh.size):
        raise ConfigError(f"--batch_size {args.batch_size} must be a multiple of --grad_accum "
                          f"{args.grad_accum} × {mesh.size} devices")
    run_dir = Path(args.output_dir).absolute()
    options = _run_options(args)
    if _has_saved_steps(run_dir):
        _check_resumable(run_dir, options)

    clips, skipped = load_clips(paths, model.config.sample_rate)
    for message in skipped:
        print(f"warning: skipping {message}", file=sys.stderr)
    if not clips:
        raise DataError(f"none of the {len(paths)} files in {args.data} could be read")
    print(f"data: {len(clips)} of {len(paths)} files readable"
          + (f" ({len(skipped)} skipped)" if skipped else "")
          + f"; {args.batch_size} crops of {crop / model.config.sample_rate:g} s per step "
          f"on {mesh.size} device(s)")
    sampler = CropSampler(clips, crop, args.batch_size, args.seed)

    manager = ocp.CheckpointManager(
        run_dir / CHECKPOINTS_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True))
    with manager:
        start = manager.latest_step() or 0
        if not start:
            (run_dir / RUN_OPTIONS_FILE).write_text(json.dumps(options, indent=2))

        state, frozen = init_train_state(model, train_config, args.seed)
        state, frozen = replicate(state, mesh), replicate(frozen, mesh)
        if start:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
            print(f"resuming {run_dir} from step {start}")
        metrics_path = run_dir / METRICS_FILE
        _keep_metrics_up_to(metrics_path, start)
        train_step = make_train_step(model.config, train_config, mesh)
        progress = _Progress(train_config.steps, start)
        try:
            with metrics_path.open("a") as metrics_file:
                for step in range(start, train_config.steps):
                    state, metrics = train_step(state, frozen,
                                                shard_batch(sampler.batch(step),
                                                            args.grad_accum, mesh))
                    done = step + 1
                    if done % args.log_every == 0 or done == train_config.steps:
                        values = jax.device_get(metrics)
                        row = {"step": done, "loss": float(values.pop("loss")),
                               **{k: float(v) for k, v in values.items()}}
                        metrics_file.write(json.dumps(row) + "\n")
                        metrics_file.flush()
                        progress.clear()
                        print(f"step {done}/{train_config.steps}  {_format(row)}",
                              flush=True)
                        progress.loss = row["loss"]
                    progress.update(done)
                    if done % args.save_every == 0 or done == train_config.steps:
                        manager.save(done, args=ocp.args.StandardSave(state))
        except KeyboardInterrupt:
            progress.clear()
            # A step interrupted mid-dispatch may have consumed (donated) the state; then the last
            # saved checkpoint is where the run resumes.
            if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
                done = int(state.step)
                if done != (manager.latest_step() or 0):
                    manager.save(done, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
            print(f"interrupted; the run resumes from step {manager.latest_step() or 0} when "
                  "the same command runs again", file=sys.stderr)
            return 130
        progress.clear()

    final = _write_final(run_dir, Losatok(merge_params(state.params, frozen), model.config))
    print(f"trained {train_config.steps} steps; final checkpoint (load_losatok) in {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0; 2 with one `error:` line on stderr; 130 when
    interrupted, after saving a checkpoint)."""
    return _cli.run_main(_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
