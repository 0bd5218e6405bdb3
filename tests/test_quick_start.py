"""The README's quick start, as written, and what the training log shows a newcomer.

The quick start's commands run from a fresh folder holding only `configs/` and `scripts/`;
tiny idx files in the official format stand in for Debian's Fashion-MNIST package, and the
training subset is 640 images instead of 10,000 (five steps of the quick config's batch of
128), logged every two steps. Nothing else of the commands changes.
"""

import json
import re
import shlex

import pytest
from data_fixtures import write_idx_dataset
from helpers import ROOT, run_main, run_script

PROGRESS = re.compile(
    r"step (\d+)/(\d+) \((\d+)%\) loss [\d.]+ top1 [\d.]+ lr [\d.e+-]+ \| (\d+) img/s \| ETA (\S+)$"
)


def quick_start_commands():
    """The shell lines of the README's quick start block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]


def test_the_quick_start_is_on_the_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert any(line.startswith("## Quick start") for line in lines[:25])
    commands = quick_start_commands()
    assert commands[0].startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert commands[1] == "apt-get install -y dataset-fashion-mnist"
    assert commands[2].startswith("python scripts/export_idx.py /usr/share/datasets/fashion-mnist")
    assert commands[3] == (
        "python -m resnet_jax.main --config configs/fashion_mnist.py:quick --workdir runs/quick"
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    user = tmp_path_factory.mktemp("newcomer")
    (user / "configs").symlink_to(ROOT / "configs")
    (user / "scripts").symlink_to(ROOT / "scripts")
    idx = tmp_path_factory.mktemp("debian")
    write_idx_dataset(idx, num_train=700, num_test=100)
    _, _, export, train = quick_start_commands()
    args = shlex.split(export)[2:]
    args[0] = str(idx)  # Debian's folder.
    args[args.index("--train_subset") + 1] = "640"
    exported = run_script("export_idx.py", *args, cwd=user)
    assert exported.returncode == 0, exported.stderr
    result = run_main(
        *shlex.split(train)[3:],
        "--config.train_split=train640",
        "--config.log_every_steps=2",
        devices=1,
        cwd=user,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return user, result.stderr


def test_quick_start_trains_one_epoch_and_evaluates_every_test_image(quick_run):
    user, _ = quick_run
    results = json.loads((user / "runs" / "quick" / "eval_results.json").read_text())
    assert results["step"] == 5  # One epoch: 640 // 128.
    assert results["num_examples"] == 100
    config = json.loads((user / "runs" / "quick" / "config.json").read_text())
    assert config["model"]["name"] == "resnet20" and config["num_epochs"] == 1.0
    assert (user / "runs" / "quick" / "checkpoints" / "5").is_dir()


def test_the_log_has_one_progress_line_per_log_step(quick_run):
    _, log = quick_run
    found = [PROGRESS.search(line) for line in log.splitlines()]
    found = [m.groups() for m in found if m]
    assert [(s, total, pct) for s, total, pct, _, _ in found] == [
        ("2", "5", "40"),
        ("4", "5", "80"),
        ("5", "5", "100"),
    ]
    assert all(int(rate) > 0 for *_, rate, _ in found)
    assert found[-1][-1] == "0s"  # Nothing left at the last step.
    # clu's logging writer printed three lines per log step; TensorBoard still gets them.
    assert "steps_per_sec=" not in log and "train_loss=" not in log
    assert "Opening image_folder's training and evaluation data" in log
    assert "Compiling the train step (step 1 waits for it)" in log
    assert re.search(r"eval at step 5: top1 [\d.]+ top5 [\d.]+ loss [\d.]+ on 100 images", log)


def test_the_run_ends_saying_where_its_results_are_and_what_to_run_next(quick_run):
    _, log = quick_run
    (closing,) = [line for line in log.splitlines() if "] Done in " in line]
    text = closing.split("] ", 1)[1]
    assert re.fullmatch(
        r"Done in \d+(s|m\d\ds): top-1 [\d.]+% on 100 test images at step 5\. Checkpoints in "
        r"runs/quick/checkpoints, results in runs/quick/eval_results\.json, curves: "
        r"tensorboard --logdir runs/quick\. Next: python -m resnet_jax\.report --workdir "
        r"runs/quick \(curves, per-class accuracy, confusion matrix\); python -m "
        r"resnet_jax\.predict --workdir runs/quick IMAGE\.\.\.",
        text,
    )


def test_a_dataset_that_cannot_be_read_leaves_no_empty_run_folder(tmp_path):
    """The first command offline used to leave an empty runs/resnet18/ behind its error."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    result = run_main(
        "--config",
        "configs/fashion_mnist.py:quick",
        "--workdir",
        "runs/quick",
        "--config.data_dir=data/not_exported",
        devices=1,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "data/not_exported" in error
    assert not (tmp_path / "runs").exists()
