"""The training loop's progress lines, on a clock the test moves by hand."""

import logging

import pytest
from absl import flags

from resnet_jax import cli, progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (130, "2m10s"), (3599, "59m59s"), (3900, "1h05m")],
)
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress.duration(seconds) == text


def test_rate_and_eta_start_after_the_first_step():
    clock = Clock()
    pace = progress.TrainProgress(start_step=0, num_steps=468, batch_size=128, clock=clock)
    clock.now += 24.0  # Input, initialisation and compilation: not in the rate nor the ETA.
    pace.first_step_done(1)
    assert pace.eta(1) == "?"
    clock.now += 99 * 0.25  # Steps 2 to 100 at 4 steps a second.
    metrics = {"loss": 1.06, "top1": 0.61, "learning_rate": 0.0891}
    line = pace.line(100, metrics, pace.images_per_second(100))
    # 99 steps of 128 images in 24.75 s; 368 steps left at 0.25 s each.
    assert line == "step 100/468 (21%) loss 1.0600 top1 0.6100 lr 0.0891 | 512 img/s | ETA 1m32s"
    clock.now += 10.0  # An evaluation of 10 s, then 100 steps at the same pace.
    clock.now += 100 * 0.25
    rate = pace.images_per_second(200)
    assert rate == pytest.approx(100 * 128 / 35.0)
    # 199 steps in 59.75 s since step 1: the evaluation's time is spread over the rest.
    assert pace.eta(200) == progress.duration(268 * 59.75 / 199)


def test_a_resumed_run_counts_from_its_first_step():
    clock = Clock()
    pace = progress.TrainProgress(start_step=400, num_steps=468, batch_size=128, clock=clock)
    clock.now += 30.0
    pace.first_step_done(401)
    clock.now += 9 * 0.5
    assert pace.images_per_second(410) == pytest.approx(9 * 128 / 4.5)
    assert pace.line(410, {"loss": 0.5, "top1": 0.9, "learning_rate": 1e-4}, 256).startswith(
        "step 410/468 (87%) loss 0.5000 top1 0.9000 lr 0.0001 | 256 img/s | ETA 29s"
    )


def test_the_eta_follows_the_last_log_lines_so_a_pause_fades_from_it():
    clock = Clock()
    pace = progress.TrainProgress(start_step=0, num_steps=10_000, batch_size=128, clock=clock)
    pace.first_step_done(1)
    metrics = {"loss": 1.0, "top1": 0.5, "learning_rate": 0.1}

    def log(step, seconds):
        clock.now += seconds
        return pace.line(step, metrics, pace.images_per_second(step))

    log(100, 99 * 0.5)  # 0.5 s a step.
    clock.now += 3600.0  # The VM is suspended for an hour.
    log(200, 100 * 0.5)
    # Within the window the pause counts: 199 steps in 3,699.5 s.
    assert pace.eta(200) == progress.duration(9800 * 3699.5 / 199)
    step = 200
    for _ in range(progress.ETA_WINDOW):
        step += 100
        line = log(step, 100 * 0.5)
    # The pause is more than ETA_WINDOW lines back: the pace is the steps' own again.
    assert line.endswith(f"ETA {progress.duration((10_000 - step) * 0.5)}")
    # A machine that slows down to 2 s a step: the ETA follows within the window.
    for _ in range(progress.ETA_WINDOW):
        step += 100
        log(step, 100 * 2.0)
    assert pace.eta(step) == progress.duration((10_000 - step) * 2.0)


def test_eval_line_shows_the_ema_weights_when_kept():
    results = {"top1": 0.91, "top5": 0.99, "loss": 0.25, "num_examples": 10000}
    assert progress.eval_line(468, results, 4.06) == (
        "eval at step 468: top1 0.9100 top5 0.9900 loss 0.2500 on 10,000 images (4.1 s)"
    )
    line = progress.eval_line(468, {**results, "ema_top1": 0.92}, 4.0)
    assert "on 10,000 images (EMA weights: top1 0.9200) (4.0 s)" in line


def _record(path, level):
    return logging.LogRecord("x", level, path, 1, "message", None, None)


@pytest.mark.parametrize("verbosity", [0, 1])
def test_library_debug_lines_stay_hidden_at_verbosity_1(verbosity):
    """PIL alone logged one DEBUG line per PNG read: 40,000 lines for a 78-step run."""
    flags.FLAGS(["test"], known_only=True)
    saved = flags.FLAGS.verbosity
    flags.FLAGS.verbosity = verbosity
    try:
        quiet = cli._QuietLibraries()
        pil = "/venv/site-packages/PIL/PngImagePlugin.py"
        orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
        ours = "/work/resnet_jax/train.py"
        clu = "/venv/site-packages/clu/platform/local.py"
        assert not quiet.filter(_record(pil, logging.DEBUG))
        assert quiet.filter(_record(ours, logging.INFO))
        assert quiet.filter(_record(orbax, logging.WARNING))
        assert quiet.filter(_record(orbax, logging.INFO)) == (verbosity == 1)
        if verbosity == 1:  # At 0, absl drops every DEBUG line before this filter.
            assert quiet.filter(_record(ours, logging.DEBUG))
            assert quiet.filter(_record(clu, logging.DEBUG))
    finally:
        flags.FLAGS.verbosity = saved


def test_tfds_warning_about_an_unprepared_folder_is_hidden():
    """tfds warns of an empty dataset folder right before the offline error says it all."""
    flags.FLAGS(["test"], known_only=True)
    record = logging.LogRecord(
        "absl",
        logging.WARNING,
        "/venv/site-packages/tensorflow_datasets/core/utils/file_utils.py",
        394,
        "Variant folder /root/tensorflow_datasets/cifar100/3.0.2 has no dataset_info.json",
        None,
        None,
    )
    assert not cli._QuietLibraries().filter(record)
