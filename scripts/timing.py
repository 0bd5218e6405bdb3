"""What the speed scripts (benchmark.py, device_check.py, compare_models.py, input_benchmark.py)
share."""

import collections
import gzip
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]

# Untimed calls before timing: the first calls also transfer and allocate.
WARMUP_STEPS = 2


def median_rate(run: Callable[[], None], images: int, repeats: int) -> float:
    """Images per second of `run()` (which processes `images`), the median of `repeats` calls."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def train_setup(config: Any, mesh: Any, num_classes: int) -> tuple[Any, Any, Any, Any]:
    """The project's fresh train state, empty train metrics, and jitted train and eval steps."""
    from resnet_jax import steps
    from resnet_jax.models import create_model

    lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=100, num_train_steps=10_000)
    model = create_model(config.model, num_classes, config.half_precision)
    state = steps.create_train_state(config, model, steps.create_optimizer(config, lr_fn), mesh)
    train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
    eval_step_fn = steps.compile_eval_step(mesh, config)
    return state, steps.empty_metrics(steps.TrainMetrics, mesh), train_step_fn, eval_step_fn


def random_batch(
    rng: Any, count: int, size: int, num_classes: int, mesh: Any, mask: bool = False
) -> dict[str, Any]:
    """A global batch of `count` uint8 noise images per process (as the inputs send) with labels."""
    import numpy as np

    from resnet_jax import sharding

    batch = {
        "image": rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, size=count).astype(np.int32),
    }
    if mask:
        batch["mask"] = np.ones(count, bool)
    return sharding.global_batch(batch, mesh)


def footprint_bytes(compiled: Any) -> int | None:
    """A compiled step's bytes on its device (temporaries, arguments, outputs, less donated)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )


def train_rate(
    step: Callable, state: Any, metrics: Any, batch: Any, steps: int, repeats: int
) -> tuple[float, Any]:
    """Images/s of `step` (state and metrics donated), the median of `repeats` runs of `steps`.

    Returns the rate and the state after the last step (the one passed in was donated).
    """
    import jax

    holder = {"state": state, "metrics": metrics}

    def run(count: int) -> None:
        for _ in range(count):
            holder["state"], holder["metrics"] = step(holder["state"], holder["metrics"], batch)
        jax.block_until_ready(holder["state"].params)

    run(WARMUP_STEPS)
    images = steps * batch["label"].shape[0]
    return median_rate(lambda: run(steps), images, repeats), holder["state"]


def device_input(
    mesh: Any, count: int, size: int, batch_size: int, crop_padding: int, random_flip: bool
) -> Any:
    """The device-resident train batches over `count` uint8 noise images of `size` px."""
    import numpy as np

    from resnet_jax import data, sharding

    split = data.DatasetSplit(
        images=np.random.default_rng(0).integers(0, 256, (count, size, size, 3), np.uint8),
        labels=np.zeros(count, np.int32),
        num_examples=count,
        num_classes=1,
        class_names=("x",),
        process_index=0,
        process_count=1,
    )
    return data.device.DeviceTrainBatches(
        split,
        mesh,
        per_process_batch_size=sharding.per_process_batch_size(batch_size, mesh),
        seed=0,
        start_step=0,
        crop_padding=crop_padding,
        random_flip=random_flip,
    )


def print_json(result: dict[str, Any], json_out: str | None) -> None:
    """Prints `result` as one JSON line (a script's last line), and writes it to `json_out`."""
    line = json.dumps(result)
    if json_out:
        pathlib.Path(json_out).write_text(line + "\n")
    print(line)


# Dense peak FLOP/s by device kind (vendor datasheets, without sparsity), for the fraction
# of peak: (bfloat16, float32). On NVIDIA GPUs a float32 step runs its convolutions and
# matmuls as TF32 on the tensor cores (XLA's default precision), so its peak is TF32's:
# H100/H200 SXM 989 / 494 TFLOP/s (NVIDIA H200 and H100 datasheets), A100 312 / 156, L4
# 121 / 60. The TPUs' float32 figures are half the bfloat16 peak, a placeholder.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v4": (275e12, 275e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2),
    "TPU v6": (918e12, 918e12 / 2),
}
# How the FLOP rates count FLOPs, for the tables and JSON that show them.
FLOP_COUNT = (
    "model count: 3 x the forward's FLOPs of --mode=summary (2 x multiply-adds of every "
    "convolution and matmul, padding included), the same on every backend"
)


def peak_flops(device: Any, half_precision: bool) -> float | None:
    """The device's dense peak FLOP/s in the step's compute dtype, when its kind is known."""
    for kind, (bf16, f32) in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return bf16 if half_precision else f32
    return None


def train_flops_per_image(config: Any, num_classes: int) -> int:
    """FLOPs of one image's train step counted from the model: 3 x its forward's.

    Not XLA's cost analysis: on GPUs that leaves out the convolutions run as cuDNN calls
    (150 times too few for ResNet-18 on an H200), and it skips the zero padding that the
    papers' convention (--mode=summary) counts.
    """
    from resnet_jax import summary
    from resnet_jax.models import create_model

    model = create_model(config.model, num_classes, config.half_precision)
    return 3 * summary.forward_flops(model, config.image_size)


def step_timers(
    config: Any, mesh: Any, num_classes: int, steps: int, repeats: int
) -> tuple[dict[str, Any], Callable[..., float]]:
    """Compiles and measures the eval step; returns the figures and a timer of train steps.

    The timer runs `steps` train steps, or as many as it is given (state and metrics
    donated, the batch already on the devices) and returns their images/s; benchmark.py
    calls it in rounds interleaved with PyTorch's and around the training loop.
    """
    import jax
    import numpy as np

    from resnet_jax import sharding
    from resnet_jax import steps as steps_lib

    batch_size = config.batch_size
    local = sharding.per_process_batch_size(batch_size, mesh)
    rng = np.random.default_rng(0)
    size = config.image_size
    batch = random_batch(rng, local, size, num_classes, mesh)
    state, metrics, train_step_fn, eval_step_fn = train_setup(config, mesh, num_classes)

    start = time.perf_counter()
    compiled = train_step_fn.lower(state, metrics, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts the program one device runs: its share of the batch. On GPUs it leaves
    # out cuDNN's convolutions: flop_rates counts from the model instead.
    flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
    flops = flops_per_device * mesh.devices.size
    step_bytes = footprint_bytes(compiled)
    holder = {"state": state, "metrics": metrics}

    def train_steps(count: int) -> None:
        for _ in range(count):
            holder["state"], holder["metrics"] = compiled(holder["state"], holder["metrics"], batch)
        jax.block_until_ready(holder["state"].params)

    def train_round(count: int = steps) -> float:
        return median_rate(lambda: train_steps(count), count * batch_size, 1)

    train_steps(WARMUP_STEPS)

    eval_size = config.eval_batch_size
    eval_local = sharding.per_process_batch_size(eval_size, mesh, "eval_batch_size")
    eval_batch = random_batch(rng, eval_local, size, num_classes, mesh, mask=True)
    eval_holder = {"metrics": steps_lib.empty_metrics(steps_lib.EvalMetrics, mesh)}

    def eval_steps(count):
        for _ in range(count):
            eval_holder["metrics"] = eval_step_fn(
                holder["state"], eval_holder["metrics"], eval_batch
            )
        jax.block_until_ready(eval_holder["metrics"])

    eval_steps(WARMUP_STEPS)
    eval_img = median_rate(lambda: eval_steps(steps), steps * eval_size, repeats)

    result = {
        "eval_img_per_s": eval_img,
        "compile_s": compile_s,
        "train_step_gflop": flops / 1e9,
        "train_step_memory_bytes_per_device": step_bytes,
    }
    return result, train_round


def flop_rates(result: dict[str, Any], config: Any, mesh: Any, num_classes: int) -> None:
    """Adds the model's FLOPs, the achieved FLOP/s and fraction of peak, and peak memory.

    Also the step's time and its compute floor (the step's FLOPs at the devices' peak):
    a step far above its floor is bound by kernel launches and latency, not arithmetic.
    """
    per_image = train_flops_per_image(config, num_classes)
    train_img = result["train_img_per_s"]
    devices = mesh.devices.size
    result["flop_count"] = FLOP_COUNT
    result["train_gflop_per_image"] = per_image / 1e9
    result["achieved_tflop_per_s"] = per_image * train_img / 1e12
    result["step_ms"] = 1e3 * config.batch_size / train_img
    result["fraction_of_peak"] = result["floor_ms"] = result["device_peak_bytes"] = None
    device = mesh.devices.flat[0]
    peak = peak_flops(device, config.half_precision)
    if peak:
        result["peak_tflop_per_s"] = peak / 1e12
        result["fraction_of_peak"] = per_image * train_img / devices / peak
        result["floor_ms"] = 1e3 * per_image * config.batch_size / devices / peak
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])


# A lent machine returns at most 16 MB a file: each trace (two files) is kept under this.
TRACE_MAX_BYTES = 6 * 2**20
# What jax.profiler writes: XProf's trace (TensorBoard's profile tab), and the same
# events in the Chrome trace format (Perfetto's UI, trace_summary).
TRACE_FILES = ("xplane.pb", "trace.json.gz")


def trace_steps(
    run_steps: Callable[[int], Any], steps: int, prefix: str, max_bytes: int = TRACE_MAX_BYTES
) -> dict[str, Any]:
    """A jax.profiler trace of `run_steps(steps)` (which must wait for its results).

    Written as PREFIX.xplane.pb and PREFIX.trace.json.gz (jax.profiler's folders of
    plugins/profile/<time>/ flattened away: a lent machine returns files at most two
    folders down; TensorBoard reads the .xplane.pb again from
    LOGDIR/plugins/profile/RUN/). A trace over `max_bytes` is taken again with one step;
    one still over is not kept. Returns the files, their size and steps, and
    trace_summary's time per trace line, or a note saying why there is no trace.
    """
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python's frames would outweigh the steps' events.
    size = 0
    for count in dict.fromkeys((steps, 1)):
        with tempfile.TemporaryDirectory(prefix="trace_") as tmp:
            start = time.perf_counter()
            try:
                with jax.profiler.trace(tmp, profiler_options=options):
                    run_steps(count)
            except Exception as e:  # A profiler that fails (no CUPTI, say) costs no figures.
                return {"trace_note": f"jax.profiler failed: {type(e).__name__}: {e}"[:300]}
            step_ms = 1e3 * (time.perf_counter() - start) / count
            found = {
                kind: sorted(pathlib.Path(tmp).rglob(f"*.{kind}"))[-1:] for kind in TRACE_FILES
            }
            size = sum(f.stat().st_size for files in found.values() for f in files)
            if size > max_bytes:
                continue
            lines = (
                trace_summary(found["trace.json.gz"][0], count) if found["trace.json.gz"] else {}
            )
            files = []
            for kind, paths in found.items():
                for path in paths:
                    files.append(f"{prefix}.{kind}")
                    shutil.move(path, files[-1])
        return {
            "trace_files": files,
            "trace_steps": count,
            "trace_bytes": size,
            "traced_step_ms": step_ms,
            "trace_ms_per_step": lines,
        }
    return {"trace_note": f"a one-step trace took {size:,} bytes, over {max_bytes:,}: not kept"}


def trace_summary(
    trace: pathlib.Path, steps: int, lines: int = 8, names: int = 6
) -> dict[str, Any]:
    """Milliseconds per step on each line of a Chrome-format trace (process / thread), and
    its largest events.

    A line's time is the sum of its events' durations, nested ones included (a host
    thread's call inside a call counts twice); on a GPU's stream lines kernels do not
    nest, so there it is the time the stream was busy.
    """
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    per_line: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in events:
        if event.get("ph") == "X":
            key = (event["pid"], event.get("tid"))
            line = f"{processes.get(key[0], key[0])} / {threads.get(key, key[1])}"
            per_line[line][event.get("name", "")[:100]] += event.get("dur", 0) / 1e3 / steps
    largest = sorted(per_line.items(), key=lambda kv: -sum(kv[1].values()))[:lines]
    return {
        line: {
            "ms": round(sum(times.values()), 3),
            "top_ms": {name: round(ms, 3) for name, ms in times.most_common(names)},
        }
        for line, times in largest
    }


def input_rates(config: Any, batches_per_repeat: int, repeats: int) -> dict[str, Any]:
    """Images/s (and per host CPU second) of the device-resident input at `config`'s size."""
    from resnet_jax import sharding

    batch = config.batch_size
    mesh = sharding.make_mesh()
    batches = device_input(
        mesh, batch * 8, config.image_size, batch, config.crop_padding, config.random_flip
    )
    next(batches)["image"].block_until_ready()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches_per_repeat):
            images = next(batches)["image"]
        images.block_until_ready()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    images = batches_per_repeat * batch
    return {
        "input_img_per_s": images / statistics.median(wall),
        "input_img_per_cpu_s": images / statistics.median(cpu),
    }


def write_noise_folder(
    root: pathlib.Path, num_train: int, num_test: int, size: int, num_classes: int = 4
) -> None:
    """An image folder of random PNGs: what the loop reads, decodes and batches."""
    import numpy as np

    from resnet_jax.data import folders

    rng = np.random.default_rng(0)
    names = [f"class{c}" for c in range(num_classes)]
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, size, size, 3), np.uint8)
        labels = [i % num_classes for i in range(count)]
        files = [f"{i:05d}.png" for i in range(count)]
        folders.write_images(root / split, images, labels, names, files)


def torch_timer(
    config: Any,
    num_classes: int,
    steps: int,
    channels_last: bool = False,
    compiled: bool = False,
) -> tuple[dict[str, Any], Callable[[], float] | None]:
    """The same network and SGD step in PyTorch, on the GPU if torch sees one.

    Eager and in the default memory format unless `channels_last` / `compiled`
    (torch.compile); in bfloat16 autocast on a GPU when config.half_precision. Returns what
    was set up and a timer of `steps` PyTorch steps (images/s), or None with a note saying
    why there is none.
    """
    none = {"torch_device": None, "torch_threads": None}
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
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
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
    images = torch.randn(config.batch_size, 3, size, size, generator=generator)
    images = images.to(device, memory_format=memory_format)
    labels = torch.randint(0, num_classes, (config.batch_size,), generator=generator).to(device)
    half = config.half_precision and device == "cuda"
    forward = torch.compile(model) if compiled else model

    def run(count):
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=half):
                loss = loss_fn(forward(images), labels)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    run(WARMUP_STEPS)

    def torch_round() -> float:
        return median_rate(lambda: run(steps), steps * config.batch_size, 1)

    info = {"torch_device": device, "torch_threads": threads, "torch_version": torch.__version__}
    return info, torch_round


def run_limited(
    command: list[str], env: dict[str, str], limit: float, cwd: pathlib.Path = CHECKOUT
) -> tuple[str, str, float]:
    """Runs `command` for at most `limit` s; returns (status, output, seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        status = f"timed out after {limit:.0f} s"
    return status, output, time.perf_counter() - start
