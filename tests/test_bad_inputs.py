"""A catalogue of bad command lines walked through every tool: each ends with one `error:` line
and status 2, never a traceback, and leaves every file and folder as it was: no input
overwritten, no input folder polluted, no output folder or `extraction.json` left behind.

Tools run in-process through their `main(argv)` on a workspace of small inputs; the workspace
(and the checkpoint folder) is snapshotted before and after each case.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from losatok_jax import (_batching, _cli, _shards, convert, extract, latents_to_wav, plan,
                         reconstruct, train)
from losatok_jax.config import RELEASED_CONFIG, load_config
from losatok_jax.errors import Note

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "tiny_chunk40"
TOOLS = {"reconstruct": reconstruct.main, "extract": extract.main, "decode": latents_to_wav.main,
         "convert": convert.main, "train": train.main, "plan": plan.main}
# A folder no user, root included, can create anything in (sysfs).
UNWRITABLE = "/sys/losatok-output"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, checkpoint) -> Path:
    ws = tmp_path_factory.mktemp("workspace")
    rng = np.random.default_rng(0)
    (ws / "corpus" / "sub").mkdir(parents=True)
    for name, seconds in (("corpus/a.wav", 1.0), ("corpus/sub/b.wav", 0.7), ("in.wav", 1.0)):
        sf.write(ws / name, 0.1 * rng.standard_normal(int(16000 * seconds)), 16000)
    (ws / "junk").mkdir()
    (ws / "junk" / "bad.wav").write_bytes(b"RIFF not really a wave file")
    os.symlink(ws / "in.wav", ws / "link.wav")
    os.symlink(ws / "corpus", ws / "corpus_link")
    (ws / "list.txt").write_text("corpus/a.wav\ncorpus/sub/b.wav\n")
    (ws / "notes.txt").write_text("a plain file\n")
    shutil.copy(GOLDEN / "losatok.pth", ws / "model.pth")
    shutil.copy(GOLDEN / "losatok.pth", ws / "model.pt")
    shutil.copy(GOLDEN / "config.yml", ws / "config.yml")
    (ws / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    (ws / "latents").mkdir()
    np.save(ws / "latents" / "gen.npy", 0.5 * rng.standard_normal((10, 16)).astype(np.float32))
    (ws / "extraction").mkdir()
    _shards.record_settings(ws / "extraction", {"format": "arrayrecord", "features": ["z"],
                                                 "dtype": "float32", "compute_dtype": "float32",
                                                 "sample": False, "seed": None})
    writer = _shards.GroupWriter(ws / "extraction", 0, 4, "arrayrecord", "float32")
    writer.write({"id": "a.wav", "path": "a.wav", "duration": 0.4, "sample_rate": 16000},
                 {"z": rng.standard_normal((10, 16)).astype(np.float32)})
    writer.close()
    _shards.merge(ws / "extraction")
    _batching.write_batch_plan(str(ws / "bf16-plan.json"), {32: 4},
                               config=load_config(GOLDEN / "config.yml"), dtype="bfloat16",
                               target="v5e:2x4", hbm_fraction=0.9)
    return ws


def snapshot(*roots: Path) -> dict:
    """Every path below `roots`: its kind, and a file's size and modification time (a folder's
    own time changes when a writability check adds and removes a temporary entry)."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            state[str(path)] = ("link" if path.is_symlink() else "folder" if path.is_dir()
                                else (stat.st_size, stat.st_mtime_ns))
    return state


def run_tool(tool: str, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = TOOLS[tool](args)
    return status, out.getvalue(), err.getvalue()


def assert_refused(tool: str, args: list[str], message: str, *watched: Path):
    before = snapshot(*watched)
    status, _, stderr = run_tool(tool, args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2, stderr
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr and "usage:" not in stderr
    assert message in errors[0], errors[0]
    assert snapshot(*watched) == before, "a refused run changed the files"


# (tool, arguments, what the error line says); {ws} is the workspace, {ckpt} the checkpoint.
CATALOGUE = [
    # reconstruct
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/in.wav", "is the input file"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/./corpus/../in.wav",
     "is the input file"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/link.wav", "is the input file"),
    ("reconstruct", "--input_path {ws}/link.wav --output_path {ws}/in.wav", "is the input file"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/out.wav "
     "--save_features {ws}/in.wav", "a .npz or a .pt"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --model_path "
     "{ws}/model.pt --config_path {ws}/config.yml --save_features {ws}/model.pt",
     "is the input file"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --model_path {ckpt} "
     "--save_features {ckpt}/f.npz", "inside the input folder"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/out.mp3", "ending in .wav"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/corpus", "ending in .wav"),
    ("reconstruct", "--input_path {ws}/missing.wav --output_path {ws}/nowhere/r.wav",
     "cannot read"),
    ("reconstruct", "--input_path {ws}/corpus --output_path {ws}/r.wav", "Is a directory"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/nowhere/r.wav",
     "cannot write"),
    ("reconstruct", f"--input_path {{ws}}/in.wav --output_path {UNWRITABLE}.wav",
     "cannot write"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --max_duration -1",
     "expected a positive number of seconds"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --max_duration soon",
     "expected a positive number of seconds"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --max_duration nan",
     "expected a positive number of seconds"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --compilation_cache_dir "
     "{ws}/notes.txt", "cannot use"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --sample --seed "
     "99999999999999999999", "expected a whole number from 0 to 2^63 - 1"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --device npu",
     "invalid choice"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --bogus",
     "unrecognized arguments"),
    ("reconstruct", "", "required"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --model_path "
     "{ws}/missing.pth", "no such file"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --model_path "
     "{ws}/corrupt.pth --config_path {ws}/config.yml", "not a readable PyTorch checkpoint"),
    ("reconstruct", "--input_path {ws}/in.wav --output_path {ws}/r.wav --config_path "
     "{ws}/missing.yml", "cannot read config"),
    ("reconstruct", "--input_path {ws}/notes.txt --output_path {ws}/r.wav --config_path "
     "{ws}/config.yml", "not a readable audio file"),
    # extract
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/corpus",
     "is the input folder"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/corpus/latents",
     "inside the input folder"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus_link --output_dir {ws}/corpus/latents",
     "inside the input folder"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/corpus_link/x",
     "inside the input folder"),
    ("extract", "--model_path {ckpt} --input {ws}/list.txt --output_dir {ws}/corpus",
     "holds input files that the manifest lists"),
    ("extract", "--model_path {ckpt} --input {ws}/list.txt --output_dir {ws}/corpus_link/sub",
     "holds input files that the manifest lists"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ckpt}/latents",
     "inside the input folder"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/notes.txt",
     "is a file"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/notes.txt/out",
     "is a file"),
    ("extract", f"--model_path {{ckpt}} --input {{ws}}/corpus --output_dir {UNWRITABLE}",
     "cannot write into"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--max_duration -1", "expected a positive number of seconds"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --batch_size 0",
     "expected a positive whole number"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --features q",
     "unknown"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --buckets 64,32",
     "expected increasing positive whole numbers"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --seed -1",
     "expected a whole number from 0 to 2^63 - 1"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --buckets x",
     "expected increasing positive whole numbers"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--max_duration inf", "expected a positive number of seconds"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --format npy "
     "--features z,mu", "one feature per clip"),
    ("extract", "--model_path {ws}/missing --input {ws}/corpus --output_dir {ws}/out",
     "no such folder"),
    ("extract", "--model_path {ws}/corrupt.pth --input {ws}/corpus --output_dir {ws}/out",
     "not a readable PyTorch checkpoint"),
    ("extract", "--model_path {ckpt} --input {ws}/missing --output_dir {ws}/out",
     "no such file or folder"),
    ("extract", "--model_path {ckpt} --input {ws}/in.wav --output_dir {ws}/out",
     "expected a folder"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--batch_plan {ws}/missing.json", "missing.json: cannot read it: No such file"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--batch_plan {ws}/notes.txt", "not a batch plan (write one with python -m losatok_jax.plan"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--batch_plan {ws}/bf16-plan.json", "planned for --compute_dtype bfloat16, not float32"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out "
     "--batch_plan {ws}/bf16-plan.json --batch_size 4", "leave out --batch_size and --buckets"),
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out --device x",
     "unrecognized arguments"),
    # decode
    ("decode", "--model_path {ckpt} --input {ws}/latents --output_dir {ws}/latents",
     "is the input folder"),
    ("decode", "--model_path {ckpt} --input {ws}/extraction --output_dir {ws}/extraction/wavs",
     "inside the input folder"),
    ("decode", "--model_path {ckpt} --input {ws}/latents/gen.npy --output_dir "
     "{ws}/extraction --normalized {ws}/extraction", "is the input folder"),
    ("decode", "--model_path {ckpt} --input {ws}/latents --output_dir {ws}/notes.txt",
     "is a file"),
    ("decode", f"--model_path {{ckpt}} --input {{ws}}/latents --output_dir {UNWRITABLE}",
     "cannot write into"),
    ("decode", "--model_path {ckpt} --input {ws}/latents --output_dir {ws}/wavs --batch_size 0",
     "expected a positive whole number"),
    ("decode", "--model_path {ws}/missing.pth --input {ws}/latents --output_dir {ws}/wavs",
     "no such file"),
    ("decode", "--model_path {ckpt} --input {ws}/missing.npy --output_dir {ws}/wavs",
     "no such file"),
    ("decode", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/wavs",
     "no .npy or .npz files"),
    # convert
    ("convert", "--model_path {ws}/model.pth --config_path {ws}/config.yml --output_dir "
     "{ws}/model.pth", "is the input file"),
    ("convert", "--model_path {ws}/model.pth --config_path {ws}/config.yml --output_dir "
     "{ws}/notes.txt", "is a file"),
    ("convert", "--model_path {ws}/model.pth --config_path {ws}/config.yml --output_dir "
     "{ws}/corpus", "not empty"),
    ("convert", f"--model_path {{ws}}/model.pth --config_path {{ws}}/config.yml --output_dir "
     f"{UNWRITABLE}", "cannot write into"),
    ("convert", "--model_path {ws}/missing.pth --output_dir {ws}/converted", "no such file"),
    ("convert", "--model_path {ws}/model.pth --output_dir {ws}/converted",
     "does not match the config: embed_dim: checkpoint has 64, config says 1280;"),
    ("convert", "--model_path {ws}/model.pth", "required"),
    # train
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/corpus/run",
     "inside the input folder"),
    ("train", "--init_from {ckpt} --data {ws}/list.txt --output_dir {ws}/corpus/sub",
     "holds input files that the manifest lists"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ckpt}",
     "is the input folder"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/notes.txt", "is a file"),
    ("train", f"--init_from {{ckpt}} --data {{ws}}/corpus --output_dir {UNWRITABLE}",
     "cannot write into"),
    ("train", "--init_from {ws}/missing --data {ws}/corpus --output_dir {ws}/run",
     "--init_from"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run --steps 0",
     "--steps must be at least 1"),
    ("train", "--init_from {ckpt} --data {ws}/junk --output_dir {ws}/run",
     "could be read"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run "
     "--segment_seconds nan", "expected a positive number of seconds"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run --trainable x",
     "invalid choice"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run --learning_rate nan",
     "learning_rate must be finite and in (0, inf]"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run --kl_weight -1",
     "the kl weight must be finite"),
    ("train", "--init_from {ckpt} --data {ws}/corpus --output_dir {ws}/run --max_grad_norm 0",
     "max_grad_norm must be finite"),
    # plan
    ("plan", "--target v9x-8", "--target v9x-8: choose from"),
    ("plan", "--target v5e-8 --operations encode,fit", "choose from encode, decode, train"),
    ("plan", "--target v5e-8 --operations decode --batch_plan {ws}/bp.json",
     "--operations must include encode"),
    ("plan", "--target v5e-8 --config_path {ws}/config.yml --batch_plan {ws}/config.yml",
     "is the input file"),
    ("plan", "--target v5e-8 --batch_size 0", "expected a positive whole number"),
    ("plan", "--target v5e-8 --model_path {ws}/missing", "no such folder"),
    ("plan", "--target v5e-8 --input {ws}/corpus --json {ws}/corpus/plan.json",
     "inside the input folder"),
    ("plan", "--target v5e-8 --config_path {ws}/config.yml --json {ws}/config.yml",
     "is the input file"),
    ("plan", "", "required: --target"),
]


@pytest.mark.parametrize("tool, args, message", CATALOGUE,
                         ids=[f"{tool}: {args}" for tool, args, _ in CATALOGUE])
def test_bad_command_lines(workspace, checkpoint, tool, args, message):
    argv = args.format(ws=workspace, ckpt=checkpoint).split()
    assert_refused(tool, argv, message, workspace, Path(checkpoint))


@pytest.mark.parametrize("tool, args, extra", [
    ("extract", "--model_path {ckpt} --input {ws}/corpus --output_dir {ws}/out", "data"),
    ("decode", "--model_path {ckpt} --input {ws}/extraction --output_dir {ws}/wavs", "data"),
    ("plan", "--target v5e-8 --config_path {ws}/config.yml --json {ws}/plan.json", "tpu"),
])
def test_a_missing_extra_is_named(workspace, checkpoint, monkeypatch, tool, args, extra):
    """Without the extra, the error says what to install, before anything is written."""
    for name in [m for m in sys.modules
                 if m.split(".")[0] in ("array_record", "grain", "libtpu")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("array_record", "grain", "libtpu"):
        monkeypatch.setitem(sys.modules, name, None)
    argv = args.format(ws=workspace, ckpt=checkpoint).split()
    assert_refused(tool, argv, f"pip install 'losatok-jax[{extra}]'", workspace)


def test_console_scripts_name_themselves(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/losatok-extract", "--bogus"])
    assert _cli.program_name("extract") == "losatok-extract"
    status, _, stderr = run_tool("extract", ["--bogus"])
    assert status == 2 and stderr.splitlines() == [
        "error: the following arguments are required: --model_path, --input, --output_dir "
        "(see losatok-extract --help)"]
    monkeypatch.setattr(sys, "argv", ["/repo/losatok_jax/extract.py"])
    assert _cli.program_name("extract") == "python -m losatok_jax.extract"


def test_a_config_found_by_name_in_the_package_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(RELEASED_CONFIG)  # the packaged name itself: no note
        assert not caught
        load_config(f"config/{RELEASED_CONFIG}")
    [note] = caught
    assert note.category is Note and "shipped with losatok-jax" in str(note.message)

    def run(args):
        warnings.warn("the fallback", Note)

    assert _cli.run_main(_cli.Parser("extract", ""), run, []) == 0
    assert capsys.readouterr().err == "note: the fallback\n"


def test_extract_and_decode_take_a_pth(workspace, tmp_path):
    """Both convert upstream's .pth once, beside it, as reconstruct does, and reuse it."""
    pth = tmp_path / "losatok.pth"
    shutil.copy(GOLDEN / "losatok.pth", pth)
    config = GOLDEN / "config.yml"
    status, stdout, stderr = run_tool("extract", [
        "--model_path", str(pth), "--config_path", str(config), "--input",
        str(workspace / "corpus"), "--output_dir", str(tmp_path / "latents"), "--format", "npy",
        "--buckets", "32,64"])
    assert status == 0, stderr
    assert "converted" in stdout and (tmp_path / "losatok.orbax" / "config.json").is_file()
    assert (tmp_path / "latents" / "a.wav.npy").is_file()
    status, stdout, stderr = run_tool("decode", [
        "--model_path", str(pth), "--config_path", str(config), "--input",
        str(tmp_path / "latents" / "a.wav.npy"), "--output_dir", str(tmp_path / "wavs")])
    assert status == 0, stderr
    assert "converted" not in stdout and (tmp_path / "wavs" / "a.wav.wav").is_file()
    index = [json.loads(line) for line in (tmp_path / "latents" / "index.jsonl").open()]
    assert {row["path"] for row in index} == {str(workspace / "corpus" / "a.wav"),
                                              str(workspace / "corpus" / "sub" / "b.wav")}
