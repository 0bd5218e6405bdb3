"""Every `python -m resnet_jax.main` command of the README, run as written.

Each runs from a fresh working directory that holds nothing but `configs/` (as a new
user's checkout would, for the parts these commands read), so relative paths such as
`--workdir runs/resnet18` are relative there. Commands that train get overrides appended
that shrink the model and the budget and point at a small dataset in the official
format; everything the README wrote stays as it is.
"""

import json
import re
import shlex

import pytest
from helpers import ROOT, run_main

SHRINK = [
    "--config.model.name=resnet8", "--config.model.width_multiplier=0.25",
    "--config.batch_size=16", "--config.eval_batch_size=8", "--config.lr_schedule=constant",
    "--config.log_every_steps=2", "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=2", "--config.profile_num_steps=0",
]  # fmt: skip


def readme_commands():
    """The README's `python -m resnet_jax.main` commands, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python3 -m venv"):  # The set-up command ends in the job.
                line = line.split("&& ")[-1]
            if line.startswith("python -m resnet_jax.main"):
                commands.append(shlex.split(line)[3:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_file_runs():
    workdirs = [c[c.index("--workdir") + 1] for c in COMMANDS if "--workdir" in c]
    assert "runs/resnet18" in workdirs and "runs/mine" in workdirs
    assert any("--mode=eval" in c for c in COMMANDS)
    assert any("--mode=summary" in c for c in COMMANDS)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def run_as_written(args, user_dir, *extra):
    result = run_main(*args, *extra, cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_summary_commands(user_dir):
    for args in (c for c in COMMANDS if "--mode=summary" in c):
        result = run_as_written(args, user_dir)
        assert json.loads(result.stdout.strip().splitlines()[-1])["total_params"] > 0


def test_train_resume_and_evaluate_commands(user_dir, cifar, toy_folder):
    root, _ = cifar
    cifar_data = [f"--config.data_dir={root / 'data'}"]
    trains = [c for c in COMMANDS if "--workdir" in c and "--mode=eval" not in c]
    first, *others = [c for c in trains if "runs/resnet18" in c]
    run_as_written(first, user_dir, *SHRINK, *cifar_data, "--config.num_train_steps=2")
    workdir = user_dir / "runs" / "resnet18"
    assert (workdir / "checkpoints" / "2").is_dir()
    # The same command again continues the run (here, to a longer budget).
    for args in others or [first]:
        result = run_as_written(args, user_dir, *SHRINK, *cifar_data, "--config.num_train_steps=4")
        assert "Resumed from checkpoint step 2" in result.stderr
    assert not (workdir / "corrupt_checkpoints").exists()
    trained = json.loads((workdir / "eval_results.json").read_text())
    assert trained["step"] == 4 and trained["num_examples"] == 37

    (evaluate,) = [c for c in COMMANDS if "--mode=eval" in c]
    result = run_as_written(evaluate, user_dir, *SHRINK, *cifar_data)
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 4 and evaluated["num_examples"] == 37
    assert evaluated["top1"] == trained["top1"]

    (folder,) = [c for c in trains if "image_folder" in " ".join(c)]
    folder = [arg.replace("PATH", str(toy_folder)) for arg in folder]
    run_as_written(folder, user_dir, *SHRINK, "--config.num_train_steps=4")
    mine = json.loads((user_dir / "runs" / "mine" / "eval_results.json").read_text())
    assert mine["num_examples"] == 63 and mine["step"] == 4
