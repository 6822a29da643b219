"""Training: parameter groups, the train step, overfitting, data parallelism and the resumable CLI.

Everything runs a tiny randomly initialised model on short synthetic clips. Train steps are
cached per (config, train config, mesh), so tests sharing a `TrainConfig` and batch shape compile
once.
"""

import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import soundfile as sf

from helpers import CLIP_SAMPLES, STEP_CONFIG, TINY, moments_and_metrics, synthetic_clips
from losatok_jax import Losatok, checkpoint, init_params, load_losatok, train, training

REPO_ROOT = Path(__file__).resolve().parent.parent


def flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(tree)


@pytest.fixture(scope="module")
def model():
    return Losatok(init_params(TINY, jax.random.key(0)), TINY)


@pytest.fixture(scope="module")
def mesh():
    return training.data_mesh()


@pytest.fixture(scope="module")
def clips():
    return synthetic_clips(8, CLIP_SAMPLES, seed=0)


def fresh_state(model, train_config, mesh, seed=0):
    state, frozen = training.init_train_state(model, train_config, seed)
    return training.replicate(state, mesh), training.replicate(frozen, mesh)


@pytest.mark.parametrize("groups, owned", [
    (("vae_head",), {("fc_a",), ("fc_mu",), ("fc_logvar",)}),
    (("acoustic_encoder",), {("dasheng_tokenizer", "encoder")}),
    (("decoder",), {("dasheng_tokenizer", "upsampler"), ("dasheng_tokenizer", "decoder")}),
])
def test_split_params_by_group(model, groups, owned):
    trainable, frozen = training.split_params(model.params, groups)
    depth = len(next(iter(owned)))
    assert {path[:depth] for path in flat(trainable)} == owned
    assert not any(path[:depth] in owned for path in flat(frozen))
    assert any(path[0] == "semantic_encoder" for path in flat(frozen))
    merged = flat(training.merge_params(trainable, frozen))
    assert merged.keys() == flat(model.params).keys()
    assert all(merged[path] is leaf for path, leaf in flat(model.params).items())


@pytest.mark.parametrize("trainable", [(), ("semantic_encoder",), ("decoder", "vocoder")])
def test_train_config_rejects_unknown_groups(trainable):
    with pytest.raises(ValueError, match="trainable must be a non-empty subset"):
        training.TrainConfig(trainable=trainable)


def test_gradients_reach_only_the_trainable_parts(model, mesh, clips):
    state, frozen = fresh_state(model, STEP_CONFIG, mesh)
    assert {path[0] for path in flat(state.params)} == {"fc_a", "fc_mu", "fc_logvar",
                                                        "dasheng_tokenizer"}
    assert not any(path[:2] == ("dasheng_tokenizer", "encoder") for path in flat(state.params))
    step = training.make_train_step(TINY, STEP_CONFIG, mesh)
    state, metrics = step(state, frozen, training.shard_batch(clips, 1, mesh))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))

    # The optimizer state covers the trainable leaves only; Adam's first moment after one step is
    # (1 − b1) · gradient, so every trainable leaf got a gradient.
    moments = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert jax.tree.structure(moments) == jax.tree.structure(state.params)
    silent = [path for path, m in flat(jax.device_get(moments)).items() if not np.any(m)]
    assert not silent, f"trainable leaves without gradient: {silent}"
    # Besides Adam's two moments only scalar step counters: nothing for frozen leaves.
    sizes = [leaf.size for leaf in jax.tree.leaves(state.opt_state)]
    assert sum(sizes) - 2 * sum(leaf.size for leaf in jax.tree.leaves(state.params)) < 10

    after = flat(jax.device_get(training.merge_params(state.params, frozen)))
    trainable = flat(state.params)
    for path, leaf in flat(model.params).items():
        assert np.array_equal(after[path], leaf) == (path not in trainable), path


def largest_moment_difference(state_a, state_b) -> float:
    """Largest relative difference ‖a − b‖ / ‖a‖ over the leaves of Adam's first moments,
    (1 − b1) · clipped gradient. Gradients are compared rather than parameters: Adam's first
    update, ≈ lr · sign(g), turns rounding in near-zero gradients into differences of 2 · lr."""
    moments = [jax.device_get(optax.tree_utils.tree_get(s.opt_state, "mu"))
               for s in (state_a, state_b)]
    return max(float(np.linalg.norm(a - b) / np.linalg.norm(a))
               for a, b in zip(*map(jax.tree.leaves, moments)))


def test_gradient_accumulation_equals_one_large_batch(model, mesh, clips):
    """Two micro-batches of 4 give the loss and gradients of one batch of 8."""
    step = training.make_train_step(TINY, STEP_CONFIG, mesh)
    results = []
    for grad_accum in (1, 2):
        state, frozen = fresh_state(model, STEP_CONFIG, mesh)
        results.append(step(state, frozen, training.shard_batch(clips, grad_accum, mesh)))
    (state_1, metrics_1), (state_2, metrics_2) = results
    for key in metrics_1:
        # grad_norm sums gradients whose float32 rounding depends on the micro-batch size
        # (about 3e-4 relative per element); a real accumulation bug is off by 10% or more.
        rtol = 1e-4 if key == "grad_norm" else 1e-5
        np.testing.assert_allclose(metrics_2[key], metrics_1[key], rtol=rtol, err_msg=key)
    # XLA's float32 rounding depends on the batch size (about 1e-7 in the semantic embeddings),
    # and the log-magnitude loss, steep on quiet STFT bins, amplifies it in the gradients to
    # about 3e-4; a lost micro-batch or a wrong noise key would differ by O(0.1) or more.
    assert largest_moment_difference(state_1, state_2) < 2e-3


def test_overfits_eight_clips(model, mesh, clips):
    """Reconstruction (mel + STFT) loss falls by at least half within 200 CPU steps."""
    config = training.TrainConfig(steps=200, learning_rate=3e-3, warmup_steps=10)
    state, frozen = fresh_state(model, config, mesh)
    step = training.make_train_step(TINY, config, mesh)
    batch = training.shard_batch(clips, 1, mesh)
    recon = []
    for _ in range(config.steps):
        state, metrics = step(state, frozen, batch)
        recon.append(metrics["mel"] + metrics["stft_sc"] + metrics["stft_mag"])
    recon = np.asarray(jax.device_get(recon))
    print(f"reconstruction loss: step 1 {recon[0]:.3f}, step 50 {recon[49]:.3f}, "
          f"step 100 {recon[99]:.3f}, step 200 {recon[-1]:.3f}")
    assert np.all(np.isfinite(recon))
    assert recon[-1] <= 0.5 * recon[0]


SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from helpers import CLIP_SAMPLES, STEP_CONFIG, TINY, synthetic_clips, moments_and_metrics
    from losatok_jax import Losatok, init_params, training

    mesh = training.data_mesh()
    model = Losatok(init_params(TINY, jax.random.key(0)), TINY)
    state, frozen = training.init_train_state(model, STEP_CONFIG, 0)
    state, frozen = training.replicate(state, mesh), training.replicate(frozen, mesh)
    batch = training.shard_batch(synthetic_clips(8, CLIP_SAMPLES, seed=0), 1, mesh)
    assert len(batch.sharding.device_set) == 2
    state, metrics = training.make_train_step(TINY, STEP_CONFIG, mesh)(state, frozen, batch)
    np.savez(sys.argv[1], **moments_and_metrics(state, metrics))
""")


def test_data_parallel_step_equals_single_device(model, mesh, clips, tmp_path):
    """Two (forced host) devices, each holding 4 of the 8 crops, compute what one device computes
    from the same two groups of 4 as micro-batches, within 1e-5: the cross-device reduction
    adds only rounding. (Per-device batch sizes change XLA's float32 rounding; the gradient
    accumulation test covers 8 crops against 2 × 4.)"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path / "sharded.npz")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sharded = np.load(tmp_path / "sharded.npz")

    state, frozen = fresh_state(model, STEP_CONFIG, mesh)
    single = moments_and_metrics(*training.make_train_step(TINY, STEP_CONFIG, mesh)(
        state, frozen, training.shard_batch(clips, 2, mesh)))
    assert set(sharded.files) == set(single)
    for key, value in single.items():
        if key.startswith("metric:"):
            np.testing.assert_allclose(sharded[key], value, rtol=1e-5, err_msg=key)
        else:
            assert np.linalg.norm(sharded[key] - value) <= 1e-5 * np.linalg.norm(value), key


# ------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def init_checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "ckpt"
    checkpoint.save(path, model)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 readable clips of 0.5 s, one more at 22.05 kHz in a subfolder, a damaged .wav and a file
    to ignore."""
    folder = tmp_path_factory.mktemp("data")
    for i, clip in enumerate(synthetic_clips(8, 8000, seed=2)):
        sf.write(folder / f"clip{i}.wav", clip, 16000)
    (folder / "sub").mkdir()
    sf.write(folder / "sub" / "clip_22k.flac", synthetic_clips(1, 11025, seed=3)[0], 22050)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    (folder / "notes.txt").write_text("not audio")
    return folder


def run_cli(capsys, *args):
    status = train.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def cli_args(init_checkpoint, data_dir, run_dir, steps=6):
    return ["--init_from", init_checkpoint, "--data", data_dir, "--output_dir", run_dir,
            "--steps", steps, "--save_every", 3, "--log_every", 1, "--batch_size", 4,
            "--segment_seconds", 0.32, "--learning_rate", 1e-3, "--warmup_steps", 1, "--seed", 5]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(init_checkpoint, data_dir, tmp_path_factory):
    """An uninterrupted 6-step run: (run dir, stdout, stderr)."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = train.main([str(a) for a in cli_args(init_checkpoint, data_dir, run_dir)])
    assert status == 0, err.getvalue()
    return run_dir, out.getvalue(), err.getvalue()


def test_cli_trains_logs_and_writes_a_loadable_checkpoint(full_run, model):
    run_dir, out, err = full_run
    rows = metrics_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "kl", "semantic", "mel", "stft_sc", "stft_mag", "grad_norm",
                "learning_rate"):
        assert all(np.isfinite(row[key]) for row in rows), key
    assert "step 6/6" in out and "final checkpoint" in out
    # The damaged file is reported and skipped; the others (including the 22.05 kHz FLAC) train.
    assert "data: 9 of 10 files readable (1 skipped)" in out
    assert err.count("warning: skipping") == 1 and "broken.wav" in err

    trained = load_losatok(run_dir / "final")
    assert trained.config == model.config
    after, before = flat(trained.params), flat(model.params)
    for path, leaf in after.items():
        moved = not np.array_equal(leaf, before[path])
        assert moved == (path[0] != "semantic_encoder"), path
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["3", "6"]


def assert_same_rows(resumed: list[dict], uninterrupted: list[dict], from_step: int):
    """A resumed run logged each step once, and from `from_step` on, what the uninterrupted run
    logged."""
    assert [row["step"] for row in resumed] == [row["step"] for row in uninterrupted]
    for row, want in zip(resumed[from_step - 1:], uninterrupted[from_step - 1:]):
        assert row.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_allclose(row[key], value, rtol=1e-6, err_msg=f"step {row['step']}")


def _fail_at_step(monkeypatch, step, error):
    original = training.CropSampler.batch

    def batch(self, index):
        if index == step - 1:
            raise error
        return original(self, index)

    monkeypatch.setattr(training.CropSampler, "batch", batch)


def test_crashed_run_resumes_to_the_same_losses(full_run, init_checkpoint, data_dir, tmp_path,
                                                monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = cli_args(init_checkpoint, data_dir, run_dir)
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 5, RuntimeError("preempted"))
        with pytest.raises(RuntimeError, match="preempted"):
            train.main([str(a) for a in args])
    capsys.readouterr()
    assert [row["step"] for row in metrics_rows(run_dir)] == [1, 2, 3, 4]

    status, out, _ = run_cli(capsys, *args)
    assert status == 0 and "resuming" in out and "from step 3" in out
    assert_same_rows(metrics_rows(run_dir), metrics_rows(full_run[0]), from_step=4)


def test_interrupt_saves_and_resumes(full_run, init_checkpoint, data_dir, tmp_path, monkeypatch,
                                     capsys):
    run_dir = tmp_path / "run"
    args = cli_args(init_checkpoint, data_dir, run_dir)
    with monkeypatch.context() as patch:
        _fail_at_step(patch, 5, KeyboardInterrupt())
        status, _, err = run_cli(capsys, *args)
    assert status == 130 and "resumes from step 4" in err

    status, out, _ = run_cli(capsys, *args)
    assert status == 0 and "from step 4" in out
    assert_same_rows(metrics_rows(run_dir), metrics_rows(full_run[0]), from_step=5)


def test_finished_run_is_not_retrained(full_run, init_checkpoint, data_dir, capsys):
    run_dir = full_run[0]
    before = (run_dir / "metrics.jsonl").read_text()
    status, out, _ = run_cli(capsys, *cli_args(init_checkpoint, data_dir, run_dir))
    assert status == 0 and "resuming" in out and "from step 6" in out
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("case", ["missing checkpoint", "missing data", "empty folder",
                                  "nothing readable", "empty manifest", "changed options",
                                  "indivisible batch", "short segment"])
def test_cli_errors_are_one_line(case, full_run, init_checkpoint, data_dir, tmp_path, capsys):
    args = cli_args(init_checkpoint, data_dir, tmp_path / "run")
    if case == "missing checkpoint":
        args[1] = tmp_path / "nowhere"
    elif case == "missing data":
        args[3] = tmp_path / "nowhere"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args[3] = tmp_path / "empty"
    elif case == "nothing readable":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.wav").write_bytes(b"garbage")
        (tmp_path / "bad" / "b.flac").write_bytes(b"")
        args[3] = tmp_path / "bad"
    elif case == "empty manifest":
        (tmp_path / "list.txt").write_text("# nothing yet\n\n")
        args[3] = tmp_path / "list.txt"
    elif case == "changed options":
        args[5] = full_run[0]
        args[args.index("--learning_rate") + 1] = 2e-3
    elif case == "indivisible batch":
        args += ["--grad_accum", 3]
    else:
        args[args.index("--segment_seconds") + 1] = 0.04
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert len([line for line in lines if not line.startswith("warning:")]) == 1, err




def test_crops_are_a_function_of_seed_and_step():
    # Clip j holds j·10000 + 1, 2, ...: a crop's first sample names its clip and offset.
    clips = [j * 10000 + np.arange(1, n + 1, dtype=np.float32)
             for j, n in enumerate((1000, 3000, 500))]
    sampler = training.CropSampler(clips, 800, batch_size=4, seed=1)
    rows = np.concatenate([sampler.batch(step) for step in range(3)])
    np.testing.assert_array_equal(training.CropSampler(clips, 800, 4, seed=1).batch(2), rows[8:])
    drawn = [int(row[0]) // 10000 for row in rows]
    for epoch in range(4):  # every epoch draws each clip once
        assert sorted(drawn[3 * epoch:3 * epoch + 3]) == [0, 1, 2]
    for row, j in zip(rows, drawn):
        offset = int(row[0]) % 10000 - 1
        piece = clips[j][offset:offset + 800]
        np.testing.assert_array_equal(row[:len(piece)], piece)
        assert not np.any(row[len(piece):])  # the 500-sample clip is zero-padded
    offsets = {int(row[0]) % 10000 for row, j in zip(rows, drawn) if j == 1}
    assert len(offsets) > 1  # crops move within a long clip
    assert not np.array_equal(training.CropSampler(clips, 800, 4, seed=2).batch(0), rows[:4])


def _dot_precisions(jaxpr) -> list:
    """The precision of every float32 dot_general in a jaxpr, nested jaxprs (jit, scan, ...)
    included. (A TPU's branch multiplies bfloat16 pieces, whose products are exact in float32.)"""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.dtype == jnp.float32:
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _dot_precisions(inner)
    return found


def test_training_uses_the_inference_precision_rule(model):
    """The loss and its gradient trace every matmul at full float32 precision, as inference
    does (`Losatok.apply`): on a GPU, training would otherwise run in TF32 and inference not."""
    trainable, frozen = training.split_params(model.params, STEP_CONFIG.trainable)
    audio = synthetic_clips(2, CLIP_SAMPLES, seed=0)
    keys = jax.random.split(jax.random.key(0), 2)

    def loss(trainable):
        return training.training_loss(trainable, frozen, audio, keys, config=TINY,
                                      weights=STEP_CONFIG.weights)[0]

    precisions = _dot_precisions(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr)
    assert len(precisions) > 20
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(p == highest for p in precisions), sorted(set(map(str, precisions)))
