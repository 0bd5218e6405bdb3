"""What the speed scripts (benchmark.py, compare_models.py, input_benchmark.py) share."""

import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

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
