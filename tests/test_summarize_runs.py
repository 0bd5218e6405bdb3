"""scripts/summarize_runs.py: each run's final top-1 and each budget's mean and spread."""

import json
import statistics
import subprocess
import sys

import pytest
from helpers import ROOT


def write_run(
    folder, seed, top1, steps=100, model="resnet20", shortcut="A", ema_top1=None, **settings
):
    folder.mkdir(parents=True)
    config = {
        "model": {"name": model, "shortcut": shortcut},
        "dataset": "image_folder",
        "train_split": "train",
        "seed": seed,
        "num_epochs": 30.0,
        "num_train_steps": -1,
        "data_dir": f"data/{folder.name}",  # Where a run was fed from: not its recipe.
        **settings,
    }
    (folder / "config.json").write_text(json.dumps(config))
    results = {"top1": top1, "step": steps, "num_examples": 10000}
    if ema_top1 is not None:
        results["ema_top1"] = ema_top1
    (folder / "eval_results.json").write_text(json.dumps(results))


def summarize(*args):
    return subprocess.run(
        [sys.executable, "scripts/summarize_runs.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_groups_by_budget_with_mean_and_sample_std(tmp_path):
    for seed, top1 in enumerate((0.9512, 0.9498, 0.9530)):
        write_run(tmp_path / f"a{seed}", seed, top1)
    write_run(tmp_path / "b", 0, 0.9401, steps=50)
    (tmp_path / "unfinished").mkdir()  # No eval_results.json: left out.
    out = tmp_path / "summary.json"
    result = summarize(*sorted(tmp_path.iterdir()), "--json_out", out)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload == json.loads(out.read_text())
    assert len(payload["runs"]) == 4
    short, full = payload["groups"]
    assert short["steps"] == 50 and short["top1_std"] is None and short["seeds"] == [0]
    assert full["steps"] == 100 and full["seeds"] == [0, 1, 2]
    assert full["top1_mean"] == statistics.mean((0.9512, 0.9498, 0.9530))
    assert full["top1_std"] == statistics.stdev((0.9512, 0.9498, 0.9530))
    assert "| resnet20 | (all alike) | 30.0 | 100 | 3 | 95.13% | 0.16 |" in result.stdout


def test_runs_of_another_recipe_are_another_group_named_by_what_differs(tmp_path):
    for seed, top1 in enumerate((0.9512, 0.9498)):
        write_run(tmp_path / f"plain{seed}", seed, top1)
        write_run(
            tmp_path / f"erased{seed}",
            seed,
            top1 + 0.004,
            ema_top1=top1 + 0.005,
            random_erasing=0.5,
        )
    write_run(tmp_path / "b_projection", 0, 0.9440, shortcut="B")
    result = summarize(*sorted(tmp_path.iterdir()))
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout.strip().splitlines()[-1])["groups"]
    assert [(g["settings"], g["seeds"]) for g in groups] == [
        ({"model.shortcut": "A", "random_erasing": 0.0}, [0, 1]),
        ({"model.shortcut": "A", "random_erasing": 0.5}, [0, 1]),
        ({"model.shortcut": "B", "random_erasing": 0.0}, [0]),
    ]
    assert groups[1]["top1_mean"] == pytest.approx(statistics.mean((0.9552, 0.9538)))
    assert groups[1]["ema_top1_mean"] == pytest.approx(statistics.mean((0.9562, 0.9548)))
    assert groups[0]["ema_top1_mean"] is None  # Runs without an EMA.
    assert "| resnet20 | model.shortcut=A, random_erasing=0.5 | 30.0 | 100 | 2 |" in result.stdout


def test_nothing_finished_is_an_error(tmp_path):
    result = summarize(tmp_path)
    assert result.returncode == 1 and "error: none of these workdirs" in result.stderr


def test_best_evaluation_is_read_from_the_logs_beside_the_final_top1(tmp_path):
    from clu import metric_writers

    write_run(tmp_path / "logged", 0, 0.9510, steps=300)
    # This run keeps an EMA: its final EMA top-1, and an EMA curve that peaks elsewhere.
    results = tmp_path / "logged" / "eval_results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "ema_top1": 0.9507}))
    writer = metric_writers.create_default_writer(str(tmp_path / "logged"))
    for step, top1, ema in ((100, 0.9402, 0.9440), (200, 0.9531, 0.9525), (300, 0.9510, 0.9507)):
        writer.write_scalars(
            step, {"eval_top1": top1, "eval_ema_top1": ema, "train_loss": 1.0 / step}
        )
    writer.close()
    write_run(tmp_path / "unlogged", 1, 0.9490, steps=300)
    result = summarize(tmp_path / "logged", tmp_path / "unlogged")
    assert result.returncode == 0, result.stderr
    logged, unlogged = json.loads(result.stdout.strip().splitlines()[-1])["runs"]
    assert (logged["top1"], logged["best_eval_step"], logged["num_evaluations"]) == (0.9510, 200, 3)
    assert logged["best_eval_top1"] == pytest.approx(0.9531)  # Written as float32.
    assert (unlogged["best_eval_top1"], unlogged["best_eval_step"]) == (None, None)
    assert (logged["ema_top1"], logged["best_eval_ema_step"]) == (0.9507, 200)
    assert logged["best_eval_ema_top1"] == pytest.approx(0.9525)
    assert unlogged["ema_top1"] is None and unlogged["best_eval_ema_top1"] is None
    assert "| 95.31% (200, of 3) | 95.07%; best 95.25% (200) |" in result.stdout
    assert "| (no logs) |  |" in result.stdout  # No EMA: an empty cell.
    (group,) = json.loads(result.stdout.strip().splitlines()[-1])["groups"]
    assert group["best_eval_top1_mean"] is None  # One run has no logs: no mean.
    assert group["ema_top1_mean"] is None  # Nor an EMA mean when one run has no EMA.


def test_wall_time_sums_each_process_and_leaves_out_the_break_before_a_resume(tmp_path):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    write_run(tmp_path / "resumed", 0, 0.9510, steps=300)
    start = 1_800_000_000.0
    # One event file per process: 1.5 h of training, a 10-hour break, then 0.5 h more.
    for name, hours in (("first", (0.0, 0.75, 1.5)), ("resumed", (11.5, 12.0))):
        with open(tmp_path / "resumed" / f"events.out.tfevents.{name}", "wb") as f:
            writer = RecordWriter(f)
            for step, h in enumerate(hours):
                event = event_pb2.Event(wall_time=start + 3600 * h, step=step)
                writer.write(event.SerializeToString())
    result = summarize(tmp_path / "resumed")
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout.strip().splitlines()[-1])["runs"]
    assert run["wall_hours"] == pytest.approx(2.0)
    assert "| 2.00 h |" in result.stdout


def test_a_run_under_way_is_shown_apart_with_its_latest_evaluation(tmp_path):
    from clu import metric_writers

    write_run(tmp_path / "done", 0, 0.9510, steps=400)
    going = tmp_path / "going"
    write_run(going, 1, 0.0, steps=400)
    (going / "eval_results.json").unlink()  # Not finished: config and logs only.
    writer = metric_writers.create_default_writer(str(going))
    for step in (100, 200, 300):
        writer.write_scalars(step, {"train_loss": 1.0 / step})
    for step, top1, ema in ((100, 0.9011, 0.9102), (200, 0.8890, 0.9230)):
        writer.write_scalars(step, {"eval_top1": top1, "eval_ema_top1": ema})
    writer.close()
    (tmp_path / "empty").mkdir()  # Neither finished nor logged: not a run.
    result = summarize(tmp_path / "done", going, tmp_path / "empty")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["seed"] for r in payload["runs"]] == [0]  # The groups leave it out.
    assert payload["groups"][0]["seeds"] == [0]
    (run,) = payload["unfinished"]
    assert (run["seed"], run["logged_step"], run["latest_eval_step"]) == (1, 300, 200)
    assert run["latest_eval_top1"] == pytest.approx(0.8890)
    assert run["latest_eval_ema_top1"] == pytest.approx(0.9230)
    assert "| going | resnet20 | 1 | 30.0 |  | 300 | 200, 88.90% | 92.30% |" in result.stdout
    # Alone, it is printed without the finished runs' tables.
    alone = summarize(going)
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.startswith("| run, not finished |")
