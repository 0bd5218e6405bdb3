"""Parameters, FLOPs, training memory and speed of several models side by side.

    python scripts/compare_models.py --models resnet18,plain18,resnet56,densenet100 \
        --batch_size 64 --steps 3 --out docs

CIFAR-100 shapes (32x32 images, 100 classes; --image_size and --num_classes change them)
and random data: no dataset is needed. Each model is configs/default.py with `model.name` set (so
resnet18 has the CIFAR stem, resnet56 shortcut A, densenet100 growth rate 12), trained
by the project's own train step (steps.compile_train_step: SGD, state donated) on one device.
A name may carry model options after a colon: `densenet100:memory_efficient` is
densenet100 with `model.memory_efficient=True` (Pleiss et al.'s recomputation).
For each model:
- params and forward GFLOP per example: resnet_jax.summary.model_summary, as
  `--mode=summary` prints them (2 x multiply-adds);
- activation MB per example: XLA's `memory_analysis()` of the compiled train step at
  --batch_size and at half of it; the slope of its temporary bytes between the two is
  what each further example costs (activations kept for the backward pass, their
  gradients, scratch), free of what does not grow with the batch (parameters, their
  gradients, the optimizer state). MB = 10^6 bytes;
- step MB at --batch_size: temporaries + arguments + outputs - donated buffers, the whole
  step's footprint on its device (as scripts/benchmark.py reports it);
- train img/s: the compiled step at --batch_size, the median of --repeats runs of --steps
  steps after 2 warm-up steps (as scripts/benchmark.py measures it).

Writes OUT/model_comparison.md (the table and how it was made), OUT/model_comparison.json
and OUT/figures/model_comparison.png; prints the table, and the JSON as the last line.

Recomputation on CPU: XLA:CPU drops jax.checkpoint's optimization barriers before its
CSE pass, which then merges the recomputed operations back into the forward pass, so a
memory_efficient DenseNet compiles to the plain one's memory (as the trainer compiles it
today). `--cpu_remat` compiles every step with `xla_disable_hlo_passes=
cse_barrier_expander`, keeping the recomputation; models without jax.checkpoint compile
as without it.

Machine notes: the memory figures are XLA's buffer assignment for the platform it runs
on; a GPU's differ (other fusions, convolution workspaces), so rerun there for GPU
figures. On a shared 2-core CPU VM the throughput varies by 10-20% between runs
(docs/benchmarks.md): compare models within one run. The default models take about
5 minutes there, a third of it DenseNet-100 (docs/model_comparison.md has the run).
"""

import json
import os
import pathlib
import shlex
import sys
import textwrap
import time
from typing import Any

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT)]

import timing  # noqa: E402  (scripts/timing.py, beside this file)
from absl import app, flags, logging  # noqa: E402

from resnet_jax import cli  # noqa: E402  (first: it sets TensorFlow's logging environment)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet18", "plain18", "resnet56", "densenet100"], "Model names.")
flags.DEFINE_integer("batch_size", 64, "Batch of the timed step; memory also at half of it.")
flags.DEFINE_integer("steps", 3, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Repeats of --steps steps; the median is reported.")
flags.DEFINE_integer("image_size", 32, "Height and width of the random images.")
flags.DEFINE_integer("num_classes", 100, "Classes of the models' last layer (CIFAR-100's 100).")
flags.DEFINE_string("out", "docs", "Folder for model_comparison.{md,json} and figures/.")
flags.DEFINE_bool(
    "cpu_remat",
    False,
    "On CPU, keep jax.checkpoint's recomputation (xla_disable_hlo_passes="
    "cse_barrier_expander), as a memory_efficient DenseNet needs to save memory there.",
)

MB = 1e6
# Model options a --models entry may name after colons (densenet100:memory_efficient): each
# sets that boolean key of the model config to True.
MODEL_OPTIONS = ("memory_efficient",)
# What --cpu_remat adds to XLA:CPU's compile options: the pass that turns jax.checkpoint's
# optimization barriers into nothing before CSE.
CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
# Columns of the table: (heading, key, format).
COLUMNS = (
    ("params", "params", "{:,}"),
    ("GFLOP/example (forward)", "gflop_per_example", "{:.3f}"),
    ("activation MB/example (train)", "activation_mb_per_example", "{:.2f}"),
    ("step MB at batch {batch}", "step_mb", "{:,.0f}"),
    ("activation bytes/example per param", "activation_bytes_per_example_per_param", "{:.1f}"),
    ("train img/s", "train_img_per_s", "{:.1f}"),
)


def model_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """A --models entry "NAME[:OPTION...]" as (NAME, OPTIONs).

    Raises:
      app.UsageError: an option is not one of MODEL_OPTIONS.
    """
    name, *options = spec.split(":")
    for option in options:
        if option not in MODEL_OPTIONS:
            raise app.UsageError(
                f"--models entry {spec!r}: unknown option {option!r} after {name!r}; the "
                f"options are {', '.join(MODEL_OPTIONS)} (e.g. densenet100:memory_efficient)."
            )
    return name, tuple(options)


def _config(spec: str):
    from configs import default

    name, options = model_spec(spec)
    config = default.get_config()
    config.model.name = name
    for option in options:
        config.model[option] = True
    config.dataset = "cifar100"
    config.image_size = FLAGS.image_size
    config.model.num_classes = FLAGS.num_classes
    config.batch_size = FLAGS.batch_size
    config.profile_num_steps = 0
    return config


def measure(name: str) -> dict[str, Any]:
    """One model's row (`name` a --models entry): counts, compiled memory, throughput."""
    import jax
    import numpy as np

    from resnet_jax import config_checks, sharding, summary

    config = _config(name)
    config_checks.validate(config)
    info = summary.model_summary(config)
    num_classes = info["num_classes"]
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, metrics, train_step_fn, _ = timing.train_setup(config, mesh, num_classes)
    size = config.image_size

    def batch_spec(batch_size):
        placed = sharding.batch_sharding(mesh)
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.uint8, sharding=placed),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=placed),
        }

    compiled, temp_bytes = {}, {}
    batch_sizes = (FLAGS.batch_size // 2, FLAGS.batch_size)
    # Merged into the options the train step is jitted with (config.cpu_convolutions).
    extra_options = (
        CPU_REMAT_OPTIONS if FLAGS.cpu_remat and jax.default_backend() == "cpu" else None
    )
    for batch_size in batch_sizes:
        start = time.perf_counter()
        lowered = train_step_fn.lower(state, metrics, batch_spec(batch_size))
        compiled[batch_size] = lowered.compile(extra_options)
        compile_s = time.perf_counter() - start
        temp_bytes[batch_size] = int(compiled[batch_size].memory_analysis().temp_size_in_bytes)
    step_bytes = timing.footprint_bytes(compiled[FLAGS.batch_size])
    slope = (temp_bytes[batch_sizes[1]] - temp_bytes[batch_sizes[0]]) / (
        batch_sizes[1] - batch_sizes[0]
    )

    batch = timing.random_batch(np.random.default_rng(0), FLAGS.batch_size, size, num_classes, mesh)
    rate, _ = timing.train_rate(
        compiled[FLAGS.batch_size], state, metrics, batch, FLAGS.steps, FLAGS.repeats
    )
    return {
        "model": name,
        "params": info["total_params"],
        "gflop_per_example": info["flops_per_example"] / 1e9,
        "temp_bytes": {str(b): temp_bytes[b] for b in batch_sizes},
        "activation_bytes_per_example": slope,
        "activation_mb_per_example": slope / MB,
        "step_bytes": step_bytes,
        "step_mb": step_bytes / MB,
        "activation_bytes_per_example_per_param": slope / info["total_params"],
        "train_img_per_s": rate,
        "compile_s": compile_s,
    }


def markdown(result: dict[str, Any]) -> str:
    """The table, with the command and machine it was measured with."""
    headings = [c[0].format(batch=result["batch_size"]) for c in COLUMNS]
    lines = [
        f"| model | {' | '.join(headings)} |",
        f"|---|{'---:|' * len(COLUMNS)}",
    ]
    for row in result["models"]:
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        lines.append(f"| {row['model']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _description(result: dict[str, Any]) -> str:
    return (
        f"{result['image_size']}x{result['image_size']} images, {result['num_classes']} "
        f"classes, float32, batch {result['batch_size']} (memory slope between "
        f"{result['batch_size'] // 2} and {result['batch_size']}), 1 x "
        f"{result['device_kind']} ({result['host_cores']} host cores), {result['date']}"
        + (", XLA:CPU keeping jax.checkpoint's recomputation" if result["cpu_remat"] else "")
    )


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Four bar panels: parameters, forward FLOPs, activation memory, throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    names = [row["model"] for row in rows]
    family = {"resnet": "tab:blue", "plain": "tab:gray", "densenet": "tab:orange"}
    colors = [next((c for f, c in family.items() if n.startswith(f)), "tab:green") for n in names]
    panels = (
        ("Parameters (millions)", [row["params"] / 1e6 for row in rows], "{:.2f}M"),
        ("Forward GFLOP per image", [row["gflop_per_example"] for row in rows], "{:.2f}"),
        (
            "Training activation memory\nper image (MB, slope over batch)",
            [row["activation_mb_per_example"] for row in rows],
            "{:.1f}",
        ),
        ("Training throughput (images/s)", [row["train_img_per_s"] for row in rows], "{:.1f}"),
    )
    figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for axis, (title, values, fmt) in zip(axes.flat, panels, strict=True):
        # Options go on a second line ("densenet40\nmemory_efficient") so labels stay apart.
        bars = axis.bar([n.replace(":", "\n") for n in names], values, color=colors)
        axis.bar_label(bars, [fmt.format(v) for v in values], padding=2, fontsize=9)
        axis.set_title(title, fontsize=11)
        axis.margins(y=0.18)
        axis.tick_params(axis="x", labelsize=9, rotation=20 if len(names) > 4 else 0)
        axis.spines[["top", "right"]].set_visible(False)
    title = (
        f"Model comparison: {_description(result)}. XLA's buffer assignment for the compiled "
        f"train step; throughput median of {result['repeats']} x {result['steps']} steps"
    )
    figure.suptitle(textwrap.fill(title, 110), fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str]) -> None:
    cli.reject_arguments(argv)
    if FLAGS.batch_size < 2:
        raise app.UsageError("--batch_size must be at least 2 (memory is also compiled at half).")
    if FLAGS.num_classes < 1 or FLAGS.image_size < 1:
        raise app.UsageError("--num_classes and --image_size must be positive.")
    for spec in FLAGS.models:
        model_spec(spec)
    cli.quiet_libraries()
    import jax

    device = jax.devices()[0]
    result: dict[str, Any] = {
        "batch_size": FLAGS.batch_size,
        "image_size": FLAGS.image_size,
        "num_classes": FLAGS.num_classes,
        "steps": FLAGS.steps,
        "repeats": FLAGS.repeats,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "cpu_remat": FLAGS.cpu_remat and device.platform == "cpu",
        "host_cores": len(os.sched_getaffinity(0)),
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", "scripts/compare_models.py", *sys.argv[1:]]),
        "models": [],
    }
    start = time.perf_counter()
    for name in FLAGS.models:
        logging.info("Measuring %s.", name)
        result["models"].append(measure(name))
    result["wall_s"] = time.perf_counter() - start
    table = markdown(result)
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_comparison.md").write_text(
        "# Model comparison (`scripts/compare_models.py`)\n\n"
        f"{_description(result)}; train throughput is the median of {result['repeats']} "
        f"runs of {result['steps']} steps. Written by:\n\n"
        f"```bash\n{result['command']}\n```\n\n{table}\n\n"
        "Activation MB/example: the growth of XLA's temporary buffers for the compiled "
        "train step per added example (what the backward pass keeps, and scratch). Step "
        "MB: the whole step at the batch size (parameters, optimizer state and batch "
        "included). Both are XLA's buffer assignment on this platform, not a measured "
        "peak; MB = 10^6 bytes. Parameters and GFLOP as `--mode=summary` counts them.\n\n"
        "![parameters, FLOPs, activation memory and throughput](figures/model_comparison.png)\n"
    )
    line = json.dumps(result)
    (out / "model_comparison.json").write_text(line + "\n")
    plot(result, out / "figures" / "model_comparison.png")
    print(table)
    print(line)


if __name__ == "__main__":
    app.run(main)
