"""Stress reproduction for multi-device hangs on CPU: many short runs, CPU saturated.

    python tests/stress_multiprocess.py --runs 30 --hogs 2
    python tests/stress_multiprocess.py --processes 1 --profile_num_steps 3 --runs 30

Each run is the smoke config trained by two processes with two simulated devices each
(jax.distributed over loopback, gloo collectives), as tests/test_multiprocess.py trains
it, or with `--processes 1` by one process with four, as tests/test_train.py's smoke run
does: 150 steps, logging every 25, evaluating and saving every 75, so that the host runs
ahead of the devices between logs. `--log_every_steps=1 --eval_every_steps=7
--checkpoint_every_steps=3` makes train steps, evaluations, metric reads and asynchronous
saves interleave as much as they can instead. `--hogs` busy-looping processes keep every
core loaded. A run that does not finish within --timeout has its stacks dumped (SIGUSR1) and
is killed; the tail of both processes' output is printed. Not collected by pytest.
"""

import argparse
import json
import multiprocessing
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from data_fixtures import write_image_folder  # noqa: E402
from helpers import MAIN, distributed_commands, main_environment, run_processes  # noqa: E402


def _hog():
    while True:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hogs", type=int, default=2, help="busy-looping processes")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--log_every_steps", type=int, default=25)
    parser.add_argument("--eval_every_steps", type=int, default=75)
    parser.add_argument("--checkpoint_every_steps", type=int, default=75)
    parser.add_argument(
        "--processes", type=int, default=2, choices=(1, 2), help="2 of 2 devices, or 1 of 4"
    )
    parser.add_argument("--profile_num_steps", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per run")
    parser.add_argument(
        "--compilation_cache",
        action="store_true",
        help="give each run a new, empty persistent compilation cache that its two processes "
        "share, as in the test suite (both compile every program and write it at once)",
    )
    args = parser.parse_args()

    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    outcomes = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp) / "toy"
            colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
            write_image_folder(folder, colors, 64, 21, size=16, seed=1)
            for run in range(args.runs):
                workdir = pathlib.Path(tmp) / f"run{run}"
                main_args = [
                    "--config",
                    "configs/smoke.py",
                    "--workdir",
                    str(workdir),
                    f"--config.data_dir={folder}",
                    f"--config.num_train_steps={args.steps}",
                    f"--config.log_every_steps={args.log_every_steps}",
                    f"--config.eval_every_steps={args.eval_every_steps}",
                    f"--config.checkpoint_every_steps={args.checkpoint_every_steps}",
                    "--config.keep_checkpoints=2",
                    f"--config.profile_num_steps={args.profile_num_steps}",
                ]
                env = main_environment(4 // args.processes)
                if args.compilation_cache:
                    env.update(
                        JAX_COMPILATION_CACHE_DIR=str(workdir / "compilation_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                    )
                start = time.monotonic()
                if args.processes == 1:
                    commands = [[*MAIN, *main_args]]
                else:
                    commands = distributed_commands(main_args)
                finished, timed_out = run_processes(commands, env=env, timeout=args.timeout)
                seconds = time.monotonic() - start
                ok = not timed_out and all(f.returncode == 0 for f in finished)
                outcome = "passed" if ok else ("timed out" if timed_out else "failed")
                outcomes.append(outcome)
                print(f"run {run}: {outcome} in {seconds:.1f} s", flush=True)
                if not ok:
                    for i, f in enumerate(finished):
                        print(f"--- process {i} (exit {f.returncode}) ---\n{f.tail(6000)}")
    finally:
        for hog in hogs:
            hog.terminate()
    counts = {o: outcomes.count(o) for o in ("passed", "failed", "timed out")}
    print(json.dumps({"runs": len(outcomes), **counts}))
    return 0 if counts["passed"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
