"""Speed of training and evaluation, beside PyTorch: one invocation, a table and JSON.

    python scripts/benchmark.py --config configs/resnet18.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/benchmark.py  # 4 CPU devices

Measures, after warm-up, as medians:
- train: the project's compiled train step (steps.compile_train_step, state donated, the
  batch already on the devices), images/s over --repeats rounds of --steps steps, the
  rounds alternating with PyTorch's and split before and after the training loop (a
  shared machine's speed drifts: each comparison sees the same conditions); also its
  compile time, XLA's FLOP count (all devices) and memory estimate (per device), the
  device's peak memory where it reports one (GPU, TPU), and on known GPUs/TPUs the
  achieved fraction of peak FLOP/s;
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

# Dense peak FLOP/s by device kind (vendor figures), for the fraction of peak.
PEAK_FLOPS = {
    # kind substring: (bfloat16, float32)
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
    "TPU v4": (275e12, 275e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2),
    "TPU v6": (918e12, 918e12 / 2),
}


def _peak_flops(device, half_precision: bool) -> float | None:
    for kind, (bf16, f32) in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return bf16 if half_precision else f32
    return None


def bench_steps(config, mesh, num_classes: int) -> tuple[dict[str, Any], Callable[[], float]]:
    """Compiles and measures the eval step; returns the figures and a timer of train steps.

    The timer runs --steps train steps (state and metrics donated, the batch already on
    the devices) and returns their images/s; main calls it in rounds interleaved with
    PyTorch's and around the training loop.
    """
    import jax
    import numpy as np

    from resnet_jax import sharding, steps

    batch_size = config.batch_size
    local = sharding.per_process_batch_size(batch_size, mesh)
    rng = np.random.default_rng(0)
    size = config.image_size
    batch = timing.random_batch(rng, local, size, num_classes, mesh)
    state, metrics, train_step_fn, eval_step_fn = timing.train_setup(config, mesh, num_classes)

    start = time.perf_counter()
    compiled = train_step_fn.lower(state, metrics, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts the program one device runs: its share of the batch.
    flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
    flops = flops_per_device * mesh.devices.size
    step_bytes = timing.footprint_bytes(compiled)
    holder = {"state": state, "metrics": metrics}

    def train_steps(count: int) -> None:
        for _ in range(count):
            holder["state"], holder["metrics"] = compiled(holder["state"], holder["metrics"], batch)
        jax.block_until_ready(holder["state"].params)

    def train_round() -> float:
        return timing.median_rate(lambda: train_steps(FLAGS.steps), FLAGS.steps * batch_size, 1)

    train_steps(timing.WARMUP_STEPS)

    eval_size = config.eval_batch_size
    eval_local = sharding.per_process_batch_size(eval_size, mesh, "eval_batch_size")
    eval_batch = timing.random_batch(rng, eval_local, size, num_classes, mesh, mask=True)
    eval_holder = {"metrics": steps.empty_metrics(steps.EvalMetrics, mesh)}

    def eval_steps(count):
        for _ in range(count):
            eval_holder["metrics"] = eval_step_fn(
                holder["state"], eval_holder["metrics"], eval_batch
            )
        jax.block_until_ready(eval_holder["metrics"])

    eval_steps(timing.WARMUP_STEPS)
    eval_img = timing.median_rate(
        lambda: eval_steps(FLAGS.steps), FLAGS.steps * eval_size, FLAGS.repeats
    )

    result = {
        "eval_img_per_s": eval_img,
        "compile_s": compile_s,
        "train_step_gflop": flops / 1e9,
        "train_step_memory_bytes_per_device": step_bytes,
    }
    return result, train_round


def flop_rates(result: dict[str, Any], config, mesh) -> None:
    """Adds the achieved FLOP/s, the fraction of the device's peak and its peak memory."""
    # XLA counts the program one device runs; train_step_gflop is over all devices.
    per_image = result["train_step_gflop"] * 1e9 / config.batch_size
    train_img = result["train_img_per_s"]
    result["achieved_tflop_per_s"] = per_image * train_img / 1e12 if per_image else None
    result["fraction_of_peak"] = result["device_peak_bytes"] = None
    device = mesh.devices.flat[0]
    peak = _peak_flops(device, config.half_precision)
    if peak and per_image:
        result["fraction_of_peak"] = per_image * train_img / mesh.devices.size / peak
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])


def bench_input(config) -> dict[str, Any]:
    batch = config.batch_size
    mesh = sharding.make_mesh()
    batches = timing.device_input(
        mesh, batch * 8, config.image_size, batch, config.crop_padding, config.random_flip
    )
    next(batches)["image"].block_until_ready()
    wall, cpu = [], []
    for _ in range(FLAGS.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(FLAGS.input_batches):
            images = next(batches)["image"]
        images.block_until_ready()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    images = FLAGS.input_batches * batch
    return {
        "input_img_per_s": images / statistics.median(wall),
        "input_img_per_cpu_s": images / statistics.median(cpu),
    }


def _write_folder(root: pathlib.Path, num_train: int, num_test: int, size: int) -> None:
    """An image folder of random PNGs in 4 classes: what the loop reads, decodes and batches."""
    import numpy as np

    from resnet_jax.data import folders

    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, size, size, 3), np.uint8)
        labels = [i % 4 for i in range(count)]
        names = [f"{i:05d}.png" for i in range(count)]
        folders.write_images(root / split, images, labels, [f"class{c}" for c in range(4)], names)


def bench_loop(config, num_classes: int) -> dict[str, Any]:
    import jax

    from resnet_jax import report, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        devices = jax.device_count()
        _write_folder(tmp / "data", 2 * config.batch_size, 4 * devices, config.image_size)
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


def bench_torch(config, num_classes: int) -> tuple[dict[str, Any], Callable[[], float] | None]:
    """The same network and SGD step in PyTorch (eager), on the GPU if torch sees one.

    Returns what was set up and a timer of --steps PyTorch steps (images/s), or None with
    a note saying why there is none.
    """
    none = {"torch_device": None, "torch_threads": None}
    if not FLAGS.torch:
        return {**none, "torch_note": "--notorch"}, None
    try:
        import torch

        from resnet_jax import torch_resnet
    except ImportError:
        return {**none, "torch_note": "PyTorch is not installed"}, None
    try:
        model = torch_resnet.from_config(config.model, num_classes)
    except ValueError as e:
        return {**none, "torch_note": str(e)}, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # XLA:CPU uses one thread per core too.
    model = model.to(device).train()
    decayed = [p for p in model.parameters() if config.weight_decay_all or p.ndim > 1]
    others = [p for p in model.parameters() if not (config.weight_decay_all or p.ndim > 1)]
    optimizer = torch.optim.SGD(
        [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    images = torch.randn(config.batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (config.batch_size,), generator=generator).to(device)
    half = config.half_precision and device == "cuda"

    def steps(count):
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=half):
                loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    steps(timing.WARMUP_STEPS)

    def torch_round() -> float:
        return timing.median_rate(lambda: steps(FLAGS.steps), FLAGS.steps * config.batch_size, 1)

    info = {"torch_device": device, "torch_threads": threads, "torch_version": torch.__version__}
    return info, torch_round


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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_libraries()
    import jax

    from resnet_jax import config_checks, sharding

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
    steps, train_round = bench_steps(config, mesh, num_classes)
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
    result.update(bench_input(config))
    result.update(bench_loop(config, num_classes))
    rounds(FLAGS.repeats - (FLAGS.repeats + 1) // 2)
    result["train_img_per_s"] = statistics.median(train_rates)
    result["train_img_per_s_rounds"] = train_rates
    result["torch_train_img_per_s"] = statistics.median(torch_rates) if torch_rates else None
    result["torch_train_img_per_s_rounds"] = torch_rates
    flop_rates(result, config, mesh)
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
