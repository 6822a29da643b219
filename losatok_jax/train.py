"""Train and fine-tune LoSATok from the command line (the training itself: `losatok_jax.training`).

    python -m losatok_jax.train --init_from ckpts/losatok_kl1e-2 --data wavs/ --output_dir runs/a \
        [--steps N] [--batch_size B] [--segment_seconds S] [--learning_rate LR] [--save_every K] \
        [--seed S] [--trainable vae_head acoustic_encoder decoder]

Started again on the same output directory, it resumes from its latest checkpoint and reproduces
the uninterrupted run. Bad input (missing checkpoint, no data, bad options) prints one `error:
...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping

import jax

from losatok_jax import _cli, _files, _model_source, losses
from losatok_jax.api import load_losatok
from losatok_jax.config import ConfigError
from losatok_jax.model import Losatok
from losatok_jax.training import (TRAINABLE_GROUPS, CropSampler, DataError, LossWeights,
                                  TrainConfig, data_mesh, init_train_state, load_clips,
                                  make_train_step, merge_params, replicate, segment_samples,
                                  shard_batch)

METRICS_FILE = "metrics.jsonl"
RUN_OPTIONS_FILE = "train_options.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"


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
