"""scripts/fashion_mnist_runs.sh and scripts/fashion_mnist_gpu.sh: shellcheck-clean, bad
arguments refused before anything runs. (Their runs take hours on 2 cores or minutes on a
GPU; docs/results.md holds what they measured.)"""

import subprocess

from helpers import ROOT, shellcheck

SCRIPTS = ("scripts/fashion_mnist_runs.sh", "scripts/fashion_mnist_gpu.sh")


def test_the_scripts_pass_shellcheck():
    result = shellcheck(*SCRIPTS)
    assert result.returncode == 0, result.stdout


def test_the_gpu_script_refuses_a_missing_out_and_an_unknown_stage(tmp_path):
    def run(*args):
        return subprocess.run(
            ["bash", "scripts/fashion_mnist_gpu.sh", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    missing = run()
    assert missing.returncode == 2 and missing.stderr.startswith("usage: bash scripts/")
    unknown = run(tmp_path / "out", "seed", 60, tmp_path / "runs")
    assert unknown.returncode == 2
    assert unknown.stderr == "error: STAGE is seeds or anchor, not 'seed'.\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
