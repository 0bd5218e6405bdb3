"""Two processes with two devices each train one model, as the workers of a pod slice do.

jax.distributed over loopback with gloo collectives: each process reads its half of the
data, the global batch spans both, Orbax saves collectively to one workdir, and the
checkpoint then evaluates in a single process on one device.
"""

import json
import socket
import subprocess

import pytest
from helpers import MAIN, ROOT, main_environment, run_main


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_evaluate_and_save_one_checkpoint(toy_folder, tmp_path):
    workdir = tmp_path / "run"
    port = free_port()
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data_dir={toy_folder}", "--distributed",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]  # fmt: skip
    processes = [
        subprocess.Popen(
            [*MAIN, *args, f"--process_id={i}"],
            cwd=ROOT,
            env=main_environment(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "global batch 32 over 4 devices in 2 processes" in outputs[0][1]
    results = json.loads((workdir / "eval_results.json").read_text())
    # 63 test images split 31/32 over the processes, each counted exactly once.
    assert results["num_examples"] == 63
    assert results["step"] == 150
    assert results["top1"] >= 0.9
    assert (workdir / "checkpoints" / "150" / "model").is_dir()

    single = run_main("--config", "configs/smoke.py", "--mode=eval", "--workdir", str(workdir),
                      f"--config.data_dir={toy_folder}", devices=1)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads(single.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 150 and evaluated["num_examples"] == 63
    assert evaluated["top1"] == results["top1"]
    assert evaluated["loss"] == pytest.approx(results["loss"], rel=1e-4)
