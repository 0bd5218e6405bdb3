"""resnet_jax.report on a real (tiny) training run: the numbers inside its files."""

import csv
import json

import numpy as np
import pytest
from data_fixtures import write_image_folder
from helpers import run_main, run_module
from PIL import Image

from resnet_jax import predict, report

# Two classes share a colour: no model tells them apart, so the matrix has errors off
# its diagonal and the test sees whether rows are the truth and columns the prediction.
COLORS = {"ash": (90, 90, 90), "cinder": (90, 90, 90), "sky": (40, 90, 230)}
STEPS, LOG_EVERY, EVAL_EVERY = 20, 5, 10


def run_report(*args):
    return run_module("resnet_jax.report", *args, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = tmp_path_factory.mktemp("colors")
    write_image_folder(data, COLORS, num_train_per_class=24, num_test_per_class=11, size=16)
    workdir = tmp_path_factory.mktemp("run")
    result = run_main(
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={data}",
        f"--config.num_train_steps={STEPS}",
        f"--config.log_every_steps={LOG_EVERY}",
        f"--config.eval_every_steps={EVAL_EVERY}",
        f"--config.checkpoint_every_steps={EVAL_EVERY}",
        "--config.batch_size=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_report("--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, workdir, workdir / "report"


def test_confusion_matrix_is_the_predictions_of_each_test_image(trained):
    data, workdir, out = trained
    counts = np.loadtxt(out / "confusion.csv", delimiter=",", dtype=np.int64)
    names = sorted(COLORS)
    # The same checkpoint classifies each test file through predict: rows are the class
    # folder, columns the top-1 answer.
    classifier = predict.Classifier(str(workdir))
    expected = np.zeros((3, 3), np.int64)
    for i, name in enumerate(names):
        files = sorted((data / "test" / name).iterdir())
        images = np.stack([classifier.read(f) for f in files])
        for answer in classifier.classify(images, batch_size=16):
            expected[i, answer[0]["label"]] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum(axis=1).tolist() == [11, 11, 11]
    # The two grey classes cannot both be right.
    assert counts[0, 1] + counts[1, 0] > 0

    summary = json.loads((out / "report.json").read_text())
    final = json.loads((workdir / "eval_results.json").read_text())
    assert summary["step"] == final["step"] == STEPS
    assert summary["num_examples"] == final["num_examples"] == 33
    assert summary["top1"] == pytest.approx(final["top1"], abs=1e-6)
    assert summary["top1"] == pytest.approx(np.trace(counts) / 33)

    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == names
    for i, row in enumerate(rows):
        assert int(row["examples"]) == 11 and int(row["correct"]) == counts[i, i]
        assert float(row["accuracy"]) == pytest.approx(counts[i, i] / 11)
    table = (out / "per_class.md").read_text()
    assert all(f"| {name} | 11 |" in table for name in names)


def test_curves_hold_what_training_logged(trained):
    _, workdir, out = trained
    scalars = report.read_scalars(workdir)
    steps, loss = scalars["train_loss"]
    assert steps.tolist() == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert scalars["eval_top1"][0].tolist() == [EVAL_EVERY, STEPS]
    assert np.isfinite(loss).all()
    summary = json.loads((out / "report.json").read_text())
    assert summary["curves"]["train_loss"] == pytest.approx(loss[-1])
    assert summary["curves"]["eval_top1"] == pytest.approx(summary["top1"], abs=1e-6)
    index = (out / "index.md").read_text()
    for name in ("curves.png", "confusion.png", "per_class.md", "confusion.csv"):
        assert f"({name})" in index
    for name, min_width in (("curves.png", 1000), ("confusion.png", 400)):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= min_width


def test_a_resumed_run_keeps_the_values_written_last(tmp_path):
    from clu import metric_writers

    for value in (1.0, 2.0):
        writer = metric_writers.create_default_writer(str(tmp_path))
        writer.write_scalars(5, {"train_loss": value})
        writer.write_scalars(10 if value == 1.0 else 6, {"train_loss": value + 10})
        writer.close()
    steps, values = report.read_scalars(tmp_path)["train_loss"]
    assert steps.tolist() == [5, 6, 10]
    assert values.tolist() == [2.0, 12.0, 11.0]


def test_bad_input_is_one_line(tmp_path, trained):
    _, workdir, _ = trained
    with pytest.raises(report.ReportError, match="No metric logs in"):
        report.read_scalars(tmp_path)
    result = run_report("--workdir", str(tmp_path / "missing"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("is not a directory.")
    # A bucket: said plainly (it had been read as the local path gs:/..., "no metric logs").
    result = run_report("--workdir", "gs://bucket/runs/resnet18")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: --workdir gs://bucket/runs/resnet18: the report reads a run on this machine's disk."
        )
    )
    result = run_report("--workdir", str(workdir), "--checkpoint=7", f"--out={tmp_path / 'r'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "7" in result.stderr.splitlines()[-1]
    # A --checkpoint that names no step is refused when the flags are parsed.
    result = run_report("--workdir", str(workdir), "--checkpoint=lastest")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: flag --checkpoint=lastest: must be latest, best or a step number (see --help "
        "for the flags)."
    ]
    # An --out that cannot be a folder: said before anything is evaluated.
    (tmp_path / "taken.md").write_text("not a folder")
    result = run_report("--workdir", str(workdir), f"--out={tmp_path / 'taken.md'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Cannot write the report to {tmp_path / 'taken.md'} (File exists): choose a "
        "folder you can write with --out=DIR."
    )
    # A bad value in the evaluation's config is refused as training refuses it.
    result = run_report(
        "--workdir",
        str(workdir),
        f"--config=configs/from_workdir.py:{workdir}",
        "--config.input=devce",
        f"--out={tmp_path / 'r2'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "input" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert "devce" in result.stderr.strip().splitlines()[-1]
    # Curves alone need no checkpoint and no dataset.
    summary = report.write_report(workdir, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "curves.png",
        "index.md",
        "report.json",
    ]
    assert "top1" not in summary and summary["curves"]["train_loss"] > 0
