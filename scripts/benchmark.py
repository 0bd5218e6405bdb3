"""Speed of training and evaluation, beside PyTorch: one invocation, a table and JSON.

    python scripts/benchmark.py --config configs/resnet18.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/benchmark.py  # 4 CPU devices

Measures, after warm-up, as medians:
- train: the project's compiled train step (steps.compile_train_step, state donated, the
  batch already on the devices), images/s over --repeats rounds of --steps steps, the
  rounds alternating with PyTorch's and split before and after the training loop (a
  shared machine's speed drifts: each comparison sees the same conditions); also its
  compile time, XLA's FLOP count (all devices) and memory estimate (per device), the
  device's peak memory where it reports one (GPU, TPU), and the achieved FLOP/s (and on
  known GPUs/TPUs the fraction of peak) from the model's FLOP count (timing.FLOP_COUNT:
  XLA's count leaves out cuDNN's convolutions on GPUs);
- eval: the compiled eval step, images/s;
- input: the device-resident training input (data.device.DeviceTrainBatches with the
  configured crop and flip, uint8 batches drawn on the devices) on random uint8 images,
  images/s and images per second of host CPU time (per host core);
- loop: the whole training loop (train.train_and_evaluate on a generated image folder:
  data, step, metrics, logging), from its own examples/s over --loop_windows windows of
  --loop_window steps after a first window that includes compilation;
- torch: when PyTorch is importable, the same network and SGD step in PyTorch (eager,
  float32, the same batch, optimizer and label smoothing, the same number of CPU threads
  as XLA uses; on a GPU when torch sees one), and the ratio of ours to it.

The last line printed is a JSON object (also written to --json_out):
train_img_per_s, loop_img_per_s, input_img_per_s, input_img_per_cpu_s, eval_img_per_s,
compile_s, torch_train_img_per_s (null without torch), ratio_vs_torch, and more.
"""

import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT)]

import timing  # noqa: E402  (scripts/timing.py, beside this file)
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax import cli, data, sharding  # noqa: E402  (cli first: TensorFlow's logging)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(_CHECKOUT / "configs" / "resnet18.py"), "Config file.", lock_config=False
)
flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
flags.DEFINE_integer(
    "repeats", 4, "Timed rounds of the train step (and of PyTorch's); the median is reported."
)
flags.DEFINE_integer("loop_window", 5, "Steps per logging window of the training loop.")
flags.DEFINE_integer("loop_windows", 4, "Timed windows of the training loop (after a first).")
flags.DEFINE_integer("input_batches", 20, "Batches the input pipeline makes per repeat.")
flags.DEFINE_bool("torch", True, "Time PyTorch too, when it is importable.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")


def bench_torch(config, num_classes: int) -> tuple[dict[str, Any], Callable[[], float] | None]:
    """PyTorch's eager step (timing.torch_timer), unless --notorch."""
    if not FLAGS.torch:
        return {"torch_device": None, "torch_threads": None, "torch_note": "--notorch"}, None
    return timing.torch_timer(config, num_classes, FLAGS.steps)


def bench_loop(config, num_classes: int) -> dict[str, Any]:
    import jax

    from resnet_jax import report, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        devices = jax.device_count()
        timing.write_noise_folder(
            tmp / "data", 2 * config.batch_size, 4 * devices, config.image_size
        )
        loop = config.copy_and_resolve_references()
        loop.dataset, loop.data_dir, loop.eval_resize_size = "image_folder", str(tmp / "data"), 0
        loop.model.num_classes = num_classes
        loop.num_train_steps = FLAGS.loop_window * (1 + FLAGS.loop_windows)
        loop.log_every_steps = FLAGS.loop_window
        loop.eval_every_steps = loop.checkpoint_every_steps = loop.num_train_steps
        loop.eval_batch_size = 4 * devices
        loop.keep_checkpoints = 1
        train.train_and_evaluate(loop, str(tmp / "run"))
        steps, rates = report.read_scalars(tmp / "run")["train_examples_per_sec"]
    timed = [rate for step, rate in zip(steps, rates, strict=True) if step > FLAGS.loop_window]
    return {"loop_img_per_s": statistics.median(timed) if timed else None}


def _num_classes(config) -> int:
    if config.model.num_classes:
        return config.model.num_classes
    if config.dataset == "image_folder" and not config.data_dir:
        return 4  # The generated folder's.
    return data.num_classes(config)


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        ("train step", "train_img_per_s", "images/s"),
        ("eval step", "eval_img_per_s", "images/s"),
        ("training loop", "loop_img_per_s", "images/s"),
        ("loop / step", "loop_vs_step", ""),
        ("input pipeline", "input_img_per_s", "images/s"),
        ("input, per CPU second", "input_img_per_cpu_s", "images/s"),
        ("input / step", "input_vs_step", ""),
        ("compile", "compile_s", "s"),
        ("train step, XLA FLOPs", "train_step_gflop", "GFLOP"),
        ("train step, XLA memory", "train_step_memory_bytes_per_device", "bytes/device"),
        ("train step, model FLOPs", "train_gflop_per_image", "GFLOP/image"),
        ("achieved", "achieved_tflop_per_s", "TFLOP/s"),
        ("fraction of peak", "fraction_of_peak", ""),
        ("PyTorch train step", "torch_train_img_per_s", "images/s"),
        ("ours / PyTorch", "ratio_vs_torch", ""),
    ]
    kernels = f", {result['cpu_convolutions']} convolutions" if result["cpu_convolutions"] else ""
    print(
        f"{result['model']}, batch {result['batch_size']}, {result['image_size']} px, "
        f"{result['dtype']}, {result['devices']} x {result['device_kind']}{kernels}"
    )
    for label, key, unit in rows:
        value = result.get(key)
        if value is None:
            shown = "-"
        elif isinstance(value, float):
            shown = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.1f}"
        else:
            shown = f"{value:,}"
        print(f"  {label:<26} {shown:>14} {unit}")


def main(argv: list[str]) -> None:
    cli.reject_arguments(argv)
    cli.quiet_libraries()
    import jax

    from resnet_jax import config_checks

    config = FLAGS.config
    config.profile_num_steps = 0
    config_checks.validate(config)
    mesh = sharding.make_mesh()
    num_classes = _num_classes(config)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "model": config.model.name,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "dtype": "bfloat16" if config.half_precision else "float32",
        # The kernels of the convolutions on CPU (resnet_jax/compile_options.py).
        "cpu_convolutions": config.cpu_convolutions if device.platform == "cpu" else None,
        "devices": mesh.devices.size,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "host_cores": len(os.sched_getaffinity(0)),
        "steps": FLAGS.steps,
        "repeats": FLAGS.repeats,
    }
    logging.info(
        "Benchmarking %s on %d x %s.", config.model.name, mesh.devices.size, device.device_kind
    )
    steps, train_round = timing.step_timers(config, mesh, num_classes, FLAGS.steps, FLAGS.repeats)
    result.update(steps)
    torch_info, torch_round = bench_torch(config, num_classes)
    result.update(torch_info)
    # This machine's speed drifts (other tenants, clocks): the train step is timed in
    # rounds alternating with PyTorch's, half before and half after the training loop,
    # so each comparison sees the same conditions.
    train_rates, torch_rates = [], []

    def rounds(count: int) -> None:
        for _ in range(count):
            train_rates.append(train_round())
            if torch_round:
                torch_rates.append(torch_round())

    rounds((FLAGS.repeats + 1) // 2)
    result.update(timing.input_rates(config, FLAGS.input_batches, FLAGS.repeats))
    result.update(bench_loop(config, num_classes))
    rounds(FLAGS.repeats - (FLAGS.repeats + 1) // 2)
    result["train_img_per_s"] = statistics.median(train_rates)
    result["train_img_per_s_rounds"] = train_rates
    result["torch_train_img_per_s"] = statistics.median(torch_rates) if torch_rates else None
    result["torch_train_img_per_s_rounds"] = torch_rates
    timing.flop_rates(result, config, mesh, num_classes)
    result["loop_vs_step"] = (
        result["loop_img_per_s"] / result["train_img_per_s"] if result["loop_img_per_s"] else None
    )
    result["input_vs_step"] = result["input_img_per_cpu_s"] / result["train_img_per_s"]
    torch_rate = result["torch_train_img_per_s"]
    result["ratio_vs_torch"] = result["train_img_per_s"] / torch_rate if torch_rate else None
    result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["date"] = time.strftime("%Y-%m-%d")
    _print_table(result)
    timing.print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
