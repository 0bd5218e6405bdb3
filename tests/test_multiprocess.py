"""Two processes with two devices each train one model, as the workers of a pod slice do.

jax.distributed over loopback with gloo collectives: each process makes its rows of each
global batch, the batch spans both, Orbax saves collectively to one workdir, and the
checkpoint then evaluates in a single process on one device. A rerun after the latest
step is damaged makes both processes agree on the step to resume from.

`tests/stress_multiprocess.py` runs many short runs like these on a loaded machine.
"""

import json

import pytest
from helpers import distributed_commands, main_environment, run_main, run_processes

# Generous for a loaded 2-core machine (a run takes ~40 s there); a hang fails the test
# with both processes' stacks (SIGUSR1) instead of blocking the suite.
TIMEOUT = 420


def run_two(args):
    finished, timed_out = run_processes(
        distributed_commands(args), env=main_environment(2), timeout=TIMEOUT
    )
    tails = "\n".join(f"--- process {i} ---\n{f.tail(40000)}" for i, f in enumerate(finished))
    assert not timed_out, f"timed out after {TIMEOUT} s; both stopped and killed\n{tails}"
    assert [f.returncode for f in finished] == [0, 0], tails
    return [f.output for f in finished]


def test_two_processes_train_evaluate_and_save_one_checkpoint(toy_folder, tmp_path):
    workdir = tmp_path / "run"
    # 40 of the smoke config's 150 steps: one process reaches 100% on the toy colours by
    # step 12 (measured, seed 0), and the checkpoints at 20 and 40 are what the rerun needs.
    args = [
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        "--config.num_train_steps=40",
        "--config.eval_every_steps=20",
        "--config.checkpoint_every_steps=20",
    ]
    outputs = run_two(args)
    assert "global batch 32 over 4 devices in 2 processes" in outputs[0]
    results = json.loads((workdir / "eval_results.json").read_text())
    # 63 test images split 31/32 over the processes, each counted exactly once.
    assert results["num_examples"] == 63
    assert results["step"] == 40
    assert results["top1"] >= 0.9
    assert (workdir / "checkpoints" / "40" / "model").is_dir()

    single = run_main(
        "--config",
        "configs/smoke.py",
        "--mode=eval",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        devices=1,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads(single.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 40 and evaluated["num_examples"] == 63
    assert evaluated["top1"] == results["top1"]
    assert evaluated["loss"] == pytest.approx(results["loss"], rel=1e-4)

    # Damage the latest step: both processes must fall back to step 20 together, and
    # process 0 alone moves step 40 aside, once.
    for path in (workdir / "checkpoints" / "40" / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 10)
    outputs = run_two(args)
    for output in outputs:
        assert "Resumed from checkpoint step 20" in output, output[-3000:]
    assert [p.name for p in (workdir / "corrupt_checkpoints").iterdir()] == ["40"]
    again = json.loads((workdir / "eval_results.json").read_text())
    assert again["step"] == 40 and again["num_examples"] == 63
    assert again["top1"] == results["top1"]
    assert again["loss"] == pytest.approx(results["loss"], rel=1e-4)
