"""Trains the runs of an experiment one after the other, skipping finished ones.

The experiments (degradation, recipes) name each run, give it a config, and call
`train_runs`: a run is trained in ROOT/<name>, a finished one (same config, final
evaluation written) is skipped, and a killed one resumes from its last checkpoint, so
rerunning an experiment's command continues where it stopped. `run_command` is the
`__main__` of each experiment's command.
"""

import json
import pathlib
import sys
from collections.abc import Callable

import ml_collections
from absl import app, logging

from resnet_jax import cli


class ExperimentError(Exception):
    """Bad experiment settings: says what to change."""


def is_finished(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> bool:
    """True if `workdir` holds a run of exactly `config` that trained to its end.

    The run's config.json is read over today's defaults (`defaults.saved_config`), so a
    run recorded before a key existed counts as finished when `config` has that key's
    default.
    """
    from resnet_jax import defaults

    results, saved = workdir / "eval_results.json", workdir / "config.json"
    if not (results.is_file() and saved.is_file()):
        return False
    recorded = defaults.saved_config(json.loads(saved.read_text()), str(saved))
    # Compared as JSON, the form in which training writes it (tuples become lists).
    return json.loads(json.dumps(recorded.to_dict())) == json.loads(json.dumps(config.to_dict()))


def train_runs(runs: dict[str, ml_collections.ConfigDict], root: pathlib.Path) -> None:
    """Trains each run in root/<name>, in order, skipping finished ones.

    Every config is checked before the first run starts. A run stopped by SIGTERM (it
    saved a checkpoint) ends the process with the trainer's preemption status.
    """
    from resnet_jax import config_checks, data, train

    for config in runs.values():
        config_checks.validate(config)
    data.hide_accelerators_from_tensorflow()
    for index, (name, config) in enumerate(runs.items()):
        workdir = root / name
        if is_finished(workdir, config):
            logging.info("Run %d of %d, %s: finished before, skipped.", index + 1, len(runs), name)
            continue
        logging.info("Run %d of %d, %s, in %s.", index + 1, len(runs), name, workdir)
        result = train.train_and_evaluate(config, str(workdir))
        if result.get("preempted"):
            logging.warning("Stopped by SIGTERM during %s; rerun the command to continue.", name)
            sys.exit(train.PREEMPTED_EXIT_STATUS)


def run_command(define_flags: Callable[[], None], run: Callable[[], None]) -> None:
    """An experiment command's `__main__`: defines its flags, parses them, calls `run`.

    A bad --config (file or override) and an ExperimentError or other user error from
    `run` end the process with a one-line `error:` message instead of a traceback.
    """
    try:
        # The default config file loads here, with any --config.key=value applied.
        define_flags()
    except Exception as e:  # noqa: BLE001 - a bad override or config file, reported as one line.
        sys.exit(cli.config_error(e))

    def main(argv: list[str]) -> None:
        cli.start_command(argv)
        cli.exit_on_user_error(run, extra=(ExperimentError,))

    app.run(main, flags_parser=cli.parse_flags)
