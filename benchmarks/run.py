"""Times the JAX port against the PyTorch oracle on the same weights, in one command.

    python -m benchmarks.run                      # --full: 1 s, 10 s, 60 s and a mixed batch
    python -m benchmarks.run --quick              # 1 s and 10 s, a smaller batch, 3 repeats
    python -m benchmarks.run --tiny               # the golden tiny model: a smoke test in seconds
    python -m benchmarks.run --device gpu --dtype bfloat16

Both frameworks run the same random full-size weights (`tests/torch_oracle.random_state_dict`,
converted for JAX by `losatok_jax.convert.build_params`): speed does not depend on the values.
PyTorch is the oracle from the tests (`TorchOracle`, float32), called one clip at a time as
upstream would be. JAX goes through the public API (`encode`, `decode`, `reconstruct`, default
`Buckets`). Each framework runs in its own subprocess, so peak memory is its own.

For every (operation, input) row: × realtime, first call (and the compile time inside it, from JAX's
compile events), steady state (median of the repeats after the first call), peak host memory
(VmHWM, reset before each row; device memory on GPU), achieved FLOP/s (matmul and convolution
FLOPs the model needs, counted analytically) against a large matmul timed in the same process, and
the JAX/PyTorch ratio. Optionally, bfloat16 accuracy against float32 on speech, music and noise
(`--accuracy`) and the start-up time of the reconstruct CLI from a converted checkpoint
(`--startup`). Writes `<output-dir>/<name>.json` and `<name>.md` (name: device, dtype, profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from benchmarks.frameworks import jax_session, torch_session
from benchmarks.quality import accuracy_worker, checkpoint_worker, startup
from benchmarks.report import _cpu_model, combine, goals, markdown
from benchmarks.workloads import (BUCKET_CHOICES, DEFAULT_CACHE_DIR, DEFAULT_OUTPUT_DIR, PROFILES,
                                  REPO_ROOT, child_env, weights_file)

# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------

SESSIONS = {"jax": jax_session, "pytorch": torch_session}
WORKERS = {"accuracy": accuracy_worker, "checkpoint": checkpoint_worker}
PROTOCOL_PREFIX = "@@ "


def serve(kind: str, spec: dict) -> None:
    """A session in a subprocess: JSON requests on stdin, JSON replies on stdout after
    PROTOCOL_PREFIX; everything else the worker prints goes to stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    def reply(value):
        replies.write(PROTOCOL_PREFIX + json.dumps(value) + "\n")
        replies.flush()

    session = SESSIONS[kind](spec)
    reply({"tasks": session.tasks()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "peak":
            reply(session.peak())
        elif request["cmd"] == "run":
            reply(session.run(request["index"], request["operation"]))
        elif request["cmd"] == "summary":
            reply(session.summary())
            return


class RemoteSession:
    """The parent's handle on a `serve` subprocess, with Session's methods."""

    def __init__(self, kind: str, spec: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", "--serve", kind, "--spec", "-"],
            cwd=REPO_ROOT, env=child_env(spec["device"]), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self.kind = kind
        self._tasks = [tuple(t) for t in self._reply()["tasks"]]

    def _reply(self):
        for line in self.process.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                return json.loads(line[len(PROTOCOL_PREFIX):])
        raise RuntimeError(f"the {self.kind} worker exited (status {self.process.wait()})")

    def _ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def tasks(self):
        return self._tasks

    def peak(self):
        return self._ask(cmd="peak")

    def run(self, index, operation):
        return self._ask(cmd="run", index=index, operation=operation)

    def summary(self):
        value = self._ask(cmd="summary")
        self.process.wait()
        return value


def run_frameworks(frameworks: list[str], spec: dict, in_process: bool) -> dict[str, dict]:
    """Loads every framework, then runs the rows interleaved: for each row, each framework in
    turn (alternating which goes first). Matmul peaks are sampled before and after."""
    sessions = {name: (SESSIONS[name](spec) if in_process else RemoteSession(name, spec))
                for name in frameworks}
    for session in sessions.values():
        session.peak()
    rows: dict[str, list[dict]] = {name: [] for name in frameworks}
    order = list(frameworks)
    for index, operation in next(iter(sessions.values())).tasks():
        for name in order:
            rows[name].append(sessions[name].run(index, operation))
        order.reverse()
    for session in sessions.values():
        session.peak()
    results = {}
    for name, session in sessions.items():
        summary = session.summary()
        for row in rows[name]:
            row["fraction_of_matmul_peak"] = (row["flops"] / row["steady_s"]
                                              / summary["matmul_peak_flops"])
        results[name] = {**summary, "rows": rows[name]}
    return results


def run_worker(kind: str, spec: dict, in_process: bool = False) -> dict:
    if in_process:
        return WORKERS[kind](spec)
    with tempfile.TemporaryDirectory(prefix="losatok-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", kind,
                               "--spec", str(spec_path), "--result", str(result_path)],
                              cwd=REPO_ROOT, env=child_env(spec["device"]))
        if done.returncode != 0:
            raise RuntimeError(f"the {kind} worker failed (exit status {done.returncode})")
        return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="1 s, 10 s, 60 s and 8 mixed clips, 5 repeats (default)")
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="1 s and 10 s clips and 4 mixed clips, 3 repeats")
    size.add_argument("--tiny", dest="profile", action="store_const", const="tiny",
                      help="the golden tiny model (smoke test; numbers mean nothing)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="JAX compute dtype (the PyTorch oracle always runs float32)")
    parser.add_argument("--frameworks", default="jax,pytorch",
                        help="comma-separated subset of jax,pytorch; none: only --accuracy "
                             "and --startup")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--durations", default=None, metavar="S,S,...",
                        help="single-clip durations in seconds (default: the profile's)")
    parser.add_argument("--mixed-clips", type=int, default=None,
                        help="clips in the mixed-length batch (default: the profile's; 0: no batch "
                        "row)")
    parser.add_argument("--buckets", choices=BUCKET_CHOICES, default="default",
                        help="JAX shape buckets (see BUCKET_CHOICES in this file)")
    parser.add_argument("--pytorch-from", default=None, metavar="JSON",
                        help="take the PyTorch rows from an earlier results file of the same "
                             "profile instead of running PyTorch again")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 vs float32 accuracy (default: on with --full)")
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=None,
                        help="reconstruct-CLI start-up time (default: on with --full)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    parser.add_argument("--name", default=None, help="results file stem (default: from options)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where random weights and the start-up checkpoint are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="run the frameworks in this process (memory figures then mix)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=sorted(SESSIONS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.serve, json.loads(sys.stdin.readline()))
        return 0
    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0

    profile_name = args.profile or "full"
    profile = PROFILES[profile_name]
    if args.repeats is not None:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.durations is not None:
        profile = dataclasses.replace(
            profile, durations=tuple(float(d) for d in args.durations.split(",") if d))
    if args.mixed_clips is not None:
        if args.mixed_clips < 0:
            parser.error(f"--mixed-clips takes a count of 0 or more, got {args.mixed_clips}")
        profile = dataclasses.replace(profile, mixed_clips=args.mixed_clips)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip() not in ("", "none")]
    unknown = set(frameworks) - {"jax", "pytorch"}
    if unknown:
        parser.error(f"--frameworks takes jax and/or pytorch (or none), got {args.frameworks}")
    accuracy = args.accuracy if args.accuracy is not None else profile_name == "full"
    startup_too = args.startup if args.startup is not None else profile_name == "full"
    name = args.name or "-".join([args.device] + ([args.dtype] if args.dtype != "float32" else [])
                                 + ([profile_name] if profile_name != "full" else [])
                                 + ([args.buckets + "-buckets"]
                                    if args.buckets != "default" else []))
    cache_dir = Path(args.cache_dir)

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"benchmark: {profile_name} profile on {args.device}, JAX {args.dtype}", flush=True)
    start = time.perf_counter()
    weights = weights_file(profile.sizes, args.seed, cache_dir)
    print(f"weights: {weights} ({time.perf_counter() - start:.0f} s)", flush=True)
    spec = {"sizes": profile.sizes, "profile": dataclasses.asdict(profile),
            "weights": str(weights), "device": args.device, "dtype": args.dtype,
            "buckets": args.buckets}
    results: dict[str, Any] = {
        "device": args.device, "dtype": args.dtype, "profile": profile_name,
        "buckets": args.buckets,
        "repeats": profile.repeats, "sizes": profile.sizes,
        "machine": f"{_cpu_model()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before, "python": platform.python_version(),
    }
    worker_results = {}
    if args.pytorch_from:
        if "pytorch" in frameworks:
            frameworks.remove("pytorch")
        earlier = json.loads(Path(args.pytorch_from).read_text())
        if earlier["profile"] != profile_name or earlier["device"] != args.device:
            parser.error(f"{args.pytorch_from} is a {earlier['profile']} run on "
                         f"{earlier['device']}, not {profile_name} on {args.device}")
        worker_results["pytorch"] = {
            **earlier["pytorch"], "from": args.pytorch_from,
            "rows": [{**row["pytorch"], "operation": row["operation"], "input": row["input"],
                      "audio_s": row["audio_s"], "clips": row["clips"], "flops": row["flops"]}
                     for row in earlier["rows"]]}
        results["pytorch"] = {k: v for k, v in worker_results["pytorch"].items() if k != "rows"}
    if frameworks:
        worker_results.update(run_frameworks(frameworks, spec, args.in_process))
    for framework in frameworks:
        results[framework] = {k: v for k, v in worker_results[framework].items() if k != "rows"}
    results["rows"] = combine(worker_results.get("jax"), worker_results.get("pytorch"))
    if accuracy:
        print("bfloat16 accuracy", flush=True)
        results["accuracy"] = run_worker("accuracy", spec, args.in_process)
    if startup_too:
        print("start-up", flush=True)
        results["startup"] = startup(spec, cache_dir, run_worker)
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["total_s"] = time.perf_counter() - start
    results["goals"] = goals(results)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (output_dir / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {output_dir / name}.json and .md ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
