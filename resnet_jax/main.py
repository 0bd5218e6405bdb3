"""Entry point: `python -m resnet_jax.main --config configs/resnet18.py --workdir DIR`.

Modes: train (default; resumes from DIR when it holds a checkpoint), eval (evaluate a
checkpoint of DIR), summary (parameters and FLOPs of the configured model).
"""

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import checkpointing, config_checks, input_pipeline

# Config files import each other (`from configs import default`); let them do so from any
# working directory when the package runs from its checkout (pip install -e .).
_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
if (_CHECKOUT / "configs" / "default.py").is_file() and str(_CHECKOUT) not in sys.path:
    sys.path.append(str(_CHECKOUT))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/resnet18.py.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "summary"], "What to do.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Join the other processes of a multi-host run (jax.distributed.initialize). On TPU pod "
    "slices, SLURM and Open MPI the peers are found automatically; elsewhere also give "
    "--coordinator_address, --num_processes and --process_id.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, with --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, with --distributed.")
flags.mark_flag_as_required("config")

# Errors that mean bad input: reported as one clear line, not a traceback.
USER_ERRORS = (
    config_checks.ConfigError,
    input_pipeline.DatasetError,
    checkpointing.CheckpointError,
    FloatingPointError,
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    try:
        config_checks.validate(config)
        if FLAGS.mode == "summary":
            from resnet_jax import summary

            summary.print_summary(config)
            return
        if not FLAGS.workdir:
            raise app.UsageError("--workdir is required for --mode=train and --mode=eval.")
        if FLAGS.distributed:
            _initialize_distributed()
        input_pipeline.hide_accelerators_from_tensorflow()
        from resnet_jax import train

        if FLAGS.mode == "train":
            train.train_and_evaluate(config, FLAGS.workdir)
        else:
            print(json.dumps(train.evaluate_checkpoint(config, FLAGS.workdir)))
    except USER_ERRORS as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")


def _initialize_distributed() -> None:
    import jax

    # Cross-process collectives of the CPU backend (local multi-process runs, tests) need
    # gloo; the setting does not touch TPU or GPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    logging.info(
        "Process %d of %d; %d local of %d devices.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
