"""The degradation experiment runner on a tiny budget: runs, skip, resume, figure, table."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, main_environment
from PIL import Image

from resnet_jax import report
from resnet_jax.experiments import degradation, runner

STEPS = 8


def run_experiment(workdir, data, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_jax.experiments.degradation",
            "--workdir",
            str(workdir),
            "--depths=8",
            "--config",
            "configs/smoke.py",
            f"--config.data_dir={data}",
            f"--config.num_train_steps={STEPS}",
            "--config.log_every_steps=2",
            "--config.eval_every_steps=4",
            "--config.checkpoint_every_steps=4",
            *extra,
        ],
        cwd=ROOT,
        env=main_environment(),
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, toy_folder):
    workdir = tmp_path_factory.mktemp("degradation")
    result = run_experiment(workdir, toy_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_table_and_json_hold_each_runs_logged_numbers(experiment):
    workdir, result = experiment
    data = json.loads((workdir / "degradation.json").read_text())
    assert [r["model"] for r in data["runs"]] == ["plain8", "resnet8"]
    table = (workdir / "degradation.md").read_text()
    assert table == degradation.table(data["runs"])
    assert table in result.stdout
    for run in data["runs"]:
        run_dir = workdir / run["model"]
        final = json.loads((run_dir / "eval_results.json").read_text())
        assert final["model"] == run["model"] and final["step"] == run["steps"] == STEPS
        assert run["final_test_error"] == pytest.approx(1 - final["top1"])
        steps, top1 = report.read_scalars(run_dir)["train_top1"]
        assert steps.tolist() == [2, 4, 6, 8] == run["train_curve"]["step"]
        # The last 10% of 8 steps holds only the last logged window.
        assert run["final_train_error"] == pytest.approx(1 - top1[-1])
        assert run["test_curve"]["step"] == [4, 8]
        assert f"| {run['model']} | {run['params']:,} | {STEPS} |" in table
        assert f"{100 * run['final_test_error']:.2f}%" in table
    # Same layers but the shortcuts: option A shortcuts have no parameters.
    assert data["runs"][0]["params"] == data["runs"][1]["params"] == 4887
    with Image.open(workdir / "degradation.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000


def test_rerun_skips_finished_runs_and_resumes_a_killed_one(experiment, toy_folder):
    workdir, _ = experiment
    before = json.loads((workdir / "resnet8" / "eval_results.json").read_text())
    # What a kill at step 6 leaves: checkpoints up to step 4, no final results.
    (workdir / "resnet8" / "eval_results.json").unlink()
    shutil.rmtree(workdir / "resnet8" / "checkpoints" / str(STEPS))
    result = run_experiment(workdir, toy_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Run 1 of 2, plain8: finished before, skipped." in result.stderr
    assert "Run 2 of 2, resnet8, in" in result.stderr
    after = json.loads((workdir / "resnet8" / "eval_results.json").read_text())
    # Resumed from step 4, it ends exactly where the uninterrupted run ended.
    assert after == before


def test_the_resnet_panel_alone(experiment, toy_folder, tmp_path):
    """--kinds=resnet: the finished ResNet run is tabulated and drawn, the plain one left out."""
    workdir, _ = experiment
    result = run_experiment(workdir, toy_folder, "--kinds=resnet", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Run 1 of 1, resnet8: finished before, skipped." in result.stderr
    data = json.loads((tmp_path / "degradation.json").read_text())
    assert [r["model"] for r in data["runs"]] == ["resnet8"]
    with Image.open(tmp_path / "degradation.png") as image:
        assert 500 < image.size[0] < 1000  # One panel.


def test_bad_depths_are_refused():
    for bad in (["21"], ["abc"], ["20", "20"], ["2"]):
        with pytest.raises(degradation.ExperimentError, match="--depths"):
            degradation.parse_depths(bad)
    assert degradation.parse_depths(["56", "20"]) == [20, 56]
    assert degradation.run_names([20, 56]) == ["plain20", "plain56", "resnet20", "resnet56"]
    assert degradation.parse_kinds(["resnet", "plain"]) == ("plain", "resnet")
    assert degradation.run_names([20, 56], ("resnet",)) == ["resnet20", "resnet56"]
    for bad in (["dense"], []):
        with pytest.raises(degradation.ExperimentError, match="--kinds"):
            degradation.parse_kinds(bad)


def test_finished_means_the_same_config(tmp_path):
    from configs import smoke

    config = degradation.run_config(smoke.get_config(), "plain8")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert not runner.is_finished(tmp_path, config)  # No results yet.
    (tmp_path / "eval_results.json").write_text("{}")
    assert runner.is_finished(tmp_path, config)
    config.num_train_steps += 1
    assert not runner.is_finished(tmp_path, config)
    # A run recorded before a key existed: finished if the key is at its default now.
    config.num_train_steps -= 1
    recorded = config.to_dict()
    del recorded["stream_decoder"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert runner.is_finished(tmp_path, config)
    config.stream_decoder = "pil"
    assert not runner.is_finished(tmp_path, config)


def test_bad_flags_are_one_line(tmp_path):
    for args, message in (
        (["--config.nope=1"], "error: no config key 'nope'."),
        (["--depths=21"], "error: --depths: '21' is not a depth"),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "resnet_jax.experiments.degradation",
                f"--workdir={tmp_path}",
                *args,
            ],
            cwd=ROOT,
            env=main_environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not any(tmp_path.iterdir())  # Nothing was started.
