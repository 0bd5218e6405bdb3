"""The Cloud TPU VM scripts: shellcheck-clean, and the gcloud commands they would run.

Each script runs with --dry-run, which prints its commands as shell-quoted lines instead
of running them, for a single host (v4-8) and for a pod slice (v4-32): the commands must
be the same but for the accelerator type, since every worker of a slice runs the same
training command.
"""

import shlex
import subprocess

import pytest
from helpers import ROOT, shellcheck

from resnet_jax import checkpointing

SCRIPTS = ROOT / "scripts"
COMMON = ["--name", "my-tpu", "--zone", "us-central2-b", "--project", "my-project"]
LOCATION = ["my-tpu", "--zone=us-central2-b", "--project=my-project"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *LOCATION]
WORKDIR = "gs://my-bucket/resnet18"


@pytest.fixture(autouse=True)
def no_gcloud(tmp_path, monkeypatch):
    """A PATH whose `gcloud` fails the test: a dry run must never reach the real one."""
    (tmp_path / "gcloud").write_text("#!/bin/sh\necho 'gcloud was run' >&2\nexit 99\n")
    (tmp_path / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return {"PATH": f"{tmp_path}:/usr/bin:/bin"}


def script(name, *args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, timeout=60
    )


def dry_run(name, *args, env=None):
    """The commands `scripts/NAME --dry-run ARGS` prints, each as an argv list."""
    result = script(name, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote(command):
    """The shell command line of an ssh command, split into words."""
    (flag,) = [arg for arg in command if arg.startswith("--command=")]
    return shlex.split(flag.removeprefix("--command="), posix=True)


def test_every_script_passes_shellcheck():
    scripts = sorted(str(p) for p in SCRIPTS.glob("tpu_*.sh"))
    assert len(scripts) == 11
    result = shellcheck(*scripts)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("tpu_type", ["v4-8", "v4-32"])
def test_create_and_delete(tpu_type):
    (create,) = dry_run("tpu_create.sh", *COMMON, "--type", tpu_type)
    assert create == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        *LOCATION,
        f"--accelerator-type={tpu_type}",
        "--version=tpu-ubuntu2204-base",
    ]
    (delete,) = dry_run("tpu_delete.sh", *COMMON)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", *LOCATION, "--quiet"]


def test_v5e_gets_its_own_software_and_spot_is_passed_on():
    (create,) = dry_run("tpu_create.sh", *COMMON, "--type=v5litepod-16", "--spot")
    assert create[-3:] == [
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",
        "--spot",
    ]


def test_settings_come_from_the_environment_too(no_gcloud):
    env = {**no_gcloud, "TPU_NAME": "env-tpu", "TPU_ZONE": "europe-west4-a"}
    (delete,) = dry_run("tpu_delete.sh", env=env)
    assert delete[5:7] == ["env-tpu", "--zone=europe-west4-a"]


def test_sync_and_install_reach_every_worker():
    tar, scp, unpack = dry_run("tpu_sync.sh", *COMMON)
    assert tar[:3] == ["tar", "-czf", tar[2]] and tar[-3:] == ["-C", str(ROOT), "."]
    assert "--exclude=.venv" in tar and "--exclude=.git" in tar
    assert scp[4:] == [
        "scp",
        "--zone=us-central2-b",
        "--project=my-project",
        tar[2],
        "my-tpu:resnet_jax_sync.tar.gz",
        "--worker=all",
    ]
    assert unpack[:-1] == [*SSH, "--worker=all"]
    assert "tar -xzf resnet_jax_sync.tar.gz -C resnet_jax" in unpack[-1]
    (install,) = dry_run("tpu_install.sh", *COMMON)
    assert install[:-1] == [*SSH, "--worker=all"]
    words = remote(install)
    assert words[:2] == ["cd", "resnet_jax"]
    # Idempotent: the venv is made only where there is none yet.
    assert "{ test -x .venv/bin/python || python3 -m venv .venv || {" in install[-1]
    assert ".venv/bin/pip install -q -U 'jax[tpu]' -e ." in install[-1]


@pytest.mark.parametrize("tpu_type", ["v4-8", "v4-32"])
def test_train_runs_the_same_detached_command_on_every_worker(tpu_type):
    (ssh,) = dry_run(
        "tpu_train.sh",
        *COMMON,
        "--type",
        tpu_type,
        "--workdir",
        WORKDIR,
        "--data_dir",
        "gs://my-bucket/tfds",
        "--",
        "--config.batch_size=256",
    )
    assert ssh[:-1] == [*SSH, "--worker=all"]
    assert remote(ssh) == [
        "cd",
        "resnet_jax",
        "&&",
        "mkdir",
        "-p",
        "logs",
        "&&",
        "nohup",
        "setsid",
        ".venv/bin/python",
        "-m",
        "resnet_jax.main",
        "--config",
        "configs/resnet18.py",
        "--workdir",
        WORKDIR,
        "--distributed",
        "--config.data_dir=gs://my-bucket/tfds",
        "--config.batch_size=256",
        ">",
        "logs/train.log",
        "2>&1",
        "<",
        "/dev/null",
        "&",
    ]


def test_logs_tensorboard_stop_and_eval():
    (logs,) = dry_run("tpu_logs.sh", *COMMON)
    assert logs[:-1] == [*SSH, "--worker=0"]
    assert remote(logs) == ["tail", "-n", "50", "-F", "resnet_jax/logs/train.log"]
    (board,) = dry_run("tpu_tensorboard.sh", *COMMON, "--workdir", WORKDIR)
    assert board[: len(SSH) + 1] == [*SSH, "--worker=0"]
    assert board[-3:] == ["--", "-L", "6006:localhost:6006"]
    assert ".venv/bin/tensorboard --logdir gs://my-bucket/resnet18" in board[-4]
    (stop,) = dry_run("tpu_stop.sh", *COMMON)
    assert stop[:-1] == [*SSH, "--worker=all"]
    assert remote(stop)[:4] == ["pkill", "-TERM", "-f", "resnet_jax.main"]
    assert "sudo rm -f /tmp/libtpu_lockfile" in stop[-1]
    (evaluate,) = dry_run(
        "tpu_eval.sh", *COMMON, "--workdir", WORKDIR, "--", "--config.eval_checkpoint=best"
    )
    assert remote(evaluate)[3:] == [
        ".venv/bin/python",
        "-m",
        "resnet_jax.main",
        "--config",
        "configs/resnet18.py",
        "--workdir",
        WORKDIR,
        "--distributed",
        "--mode=eval",
        "--config.eval_checkpoint=best",
    ]
    (prepare,) = dry_run("tpu_prepare_data.sh", *COMMON, "--data_dir", "gs://my-bucket/tfds")
    assert remote(prepare)[3:] == [
        ".venv/bin/tfds",
        "build",
        "cifar100",
        "--data_dir=gs://my-bucket/tfds",
    ]


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("tpu_create.sh", ["--zone", "z"], "TPU_NAME is not set"),
        ("tpu_train.sh", [*COMMON, "--workdir", "runs/local"], "must be a gs:// bucket path"),
        ("tpu_train.sh", [*COMMON], "WORKDIR is not set"),
        ("tpu_delete.sh", [*COMMON, "--nmae", "x"], "unknown flag --nmae"),
        ("tpu_delete.sh", ["--name"], "--name needs a value"),
    ],
)
def test_bad_settings_are_one_line_errors(name, args, message, no_gcloud):
    result = script(name, "--dry-run", *args, env=no_gcloud)  # No TPU_* variables.
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_a_gs_workdir_is_kept_as_it_is_and_a_relative_one_made_absolute(tmp_path, monkeypatch):
    assert str(checkpointing.absolute_workdir(WORKDIR)) == WORKDIR
    monkeypatch.chdir(tmp_path)
    assert str(checkpointing.absolute_workdir("runs/x")) == str(tmp_path / "runs" / "x")
