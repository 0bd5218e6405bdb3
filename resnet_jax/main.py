"""Entry point: `python -m resnet_jax.main --config configs/resnet18.py --workdir DIR`.

Modes: train (default; resumes from DIR when it holds a checkpoint), eval (evaluate a
checkpoint of DIR), summary (parameters and FLOPs of the configured model).

Exit status: 0 when the job is done, 1 after an error (one line saying what to do),
143 when a SIGTERM (preemption) stopped training after saving a checkpoint: rerun the
same command to continue.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import cli, config_checks, data

# Config files import each other (`from configs import default`).
cli.use_checkout_configs()

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
cli.require_flag("config", "the config file of the run (e.g. --config configs/resnet18.py)")


def _deterministic_gpu() -> None:
    """Asks XLA for reproducible GPU kernels; read when jax starts its backends (not yet)."""
    flag = "--xla_gpu_deterministic_ops=true"
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def main(argv: list[str]) -> None:
    cli.start_command(argv)
    cli.exit_on_user_error(lambda: _run(FLAGS.config))


def _run(config) -> None:
    config_checks.validate(config)
    if FLAGS.mode == "summary":
        from resnet_jax import summary

        summary.print_summary(config)
        return
    if not FLAGS.workdir:
        raise cli.FlagError(
            f"--workdir is required for --mode={FLAGS.mode}: the run folder, for its "
            "checkpoints, logs and results (e.g. --workdir runs/resnet18)."
        )
    if config.deterministic:
        _deterministic_gpu()
    if FLAGS.distributed:
        _initialize_distributed()
    if FLAGS.mode == "train" or config.dataset != "image_folder":
        # TensorFlow reads tfds datasets and writes training's TensorBoard summaries
        # (clu); an image folder's evaluation never loads it (5-6 s of a CPU's time).
        data.hide_accelerators_from_tensorflow()
    if FLAGS.mode == "train":
        from resnet_jax import train

        result = train.train_and_evaluate(config, FLAGS.workdir)
        if result.get("preempted"):
            sys.exit(train.PREEMPTED_EXIT_STATUS)
    else:
        from resnet_jax import evaluate  # Not train: clu's summary writer loads TensorFlow.

        print(json.dumps(evaluate.evaluate_checkpoint(config, FLAGS.workdir)))


def _initialize_distributed() -> None:
    import jax

    # Cross-process collectives of the CPU backend (local multi-process runs, tests) need
    # gloo; the setting does not touch TPU or GPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Orbax's barriers between processes are XLA programs with collectives by default
    # (sync_global_devices): programs of their own, launched beside the train step's,
    # that processes can reach in different orders. Its other kind waits on the
    # coordination service jax.distributed starts (no XLA program, and with a timeout).
    FLAGS.experimental_orbax_use_distributed_barrier = True
    try:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    except (ValueError, RuntimeError) as e:
        reason = str(e).strip().rstrip(".")
        raise cli.FlagError(
            f"--distributed could not start jax.distributed ({reason}). On a TPU VM "
            "or a SLURM job jax finds the processes itself; elsewhere give every process "
            "--coordinator_address=HOST:PORT (process 0's) --num_processes=N --process_id=I, "
            "or leave out --distributed for one process."
        ) from e
    logging.info(
        "Process %d of %d; %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
