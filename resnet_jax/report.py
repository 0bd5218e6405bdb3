"""A run's report: training curves, per-class accuracy and a confusion matrix, as files.

    python -m resnet_jax.report --workdir runs/resnet18

Writes into WORKDIR/report/ (or --out):
- curves.png: loss, top-1 accuracy (train and test) and the learning rate against the
  step, read from the run's TensorBoard event files (what training logged);
- per_class.md and per_class.csv: each class's test examples, accuracy and most
  frequent wrong answer; confusion.csv (rows: true class, columns: predicted) and
  confusion.png (each row divided by its class's examples);
- index.md: the run's settings and results, linking all of the above.

The confusion matrix comes from evaluating a checkpoint (--checkpoint: latest, best or a
step) on the run's test split, with the run's own config (its config.json; --config
with overrides such as --config.data_dir=... when the data moved). --curves_only skips
the evaluation. The evaluation logs its progress; it runs in one process.
"""

import csv
import functools
import json
import pathlib
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import cli

FLAGS = flags.FLAGS

# Curves: (panel title, y label, [(tag, legend label), ...]).
CURVE_PANELS = (
    ("Loss", "cross-entropy", (("train_loss", "train"), ("eval_loss", "test"))),
    ("Top-1 accuracy", "top-1", (("train_top1", "train (augmented)"), ("eval_top1", "test"))),
    ("Learning rate", "learning rate", (("train_learning_rate", "train"),)),
)
# Above this many classes, the confusion matrix's axes show indices, not names.
_NAMED_AXES_MAX_CLASSES = 30
# Up to this many classes, each cell also shows its count.
_ANNOTATED_MAX_CLASSES = 12


class ReportError(Exception):
    """A run that cannot be reported on (no logs, nothing to evaluate): says what to do."""


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string("workdir", None, "Directory of the run.")
    flags.DEFINE_string("out", None, "Where to write the report (default: WORKDIR/report).")
    cli.define_checkpoint_flag("Checkpoint to evaluate: latest, best or a step.")
    cli.define_weights_flag()
    flags.DEFINE_bool(
        "flip",
        None,
        "Flip test-time augmentation in the evaluation (default: the config's eval_flip).",
    )
    flags.DEFINE_bool("curves_only", False, "Only the curves; no evaluation, no confusion matrix.")
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config of the evaluation (default: the run's config.json).",
        lock_config=True,
    )
    cli.require_flag("workdir", "the run folder to report on (e.g. --workdir runs/resnet18)")


def read_scalars(workdir: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar a run logged: tag -> (steps, values), sorted by step.

    A step logged twice (a run killed after logging it, then resumed from an earlier
    checkpoint) keeps the value written last, which is the one of the resumed run.

    Raises:
      ReportError: the folder holds no event files.
    """
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    workdir = pathlib.Path(workdir)
    _require_logs(workdir)
    events = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={"tensors": 0, "scalars": 0}
    )
    events.Reload()
    tags = events.Tags()
    latest: dict[str, dict[int, tuple[float, float]]] = {}
    for tag in tags.get("tensors", []):
        for e in events.Tensors(tag):
            value = float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)).reshape(-1)[0])
            _keep_latest(latest.setdefault(tag, {}), e.step, e.wall_time, value)
    for tag in tags.get("scalars", []):
        for e in events.Scalars(tag):
            _keep_latest(latest.setdefault(tag, {}), e.step, e.wall_time, e.value)
    result = {}
    for tag, by_step in latest.items():
        steps = np.array(sorted(by_step), np.int64)
        result[tag] = (steps, np.array([by_step[s][1] for s in steps], np.float64))
    return result


def _require_logs(workdir: pathlib.Path) -> None:
    if not any(workdir.glob("events.out.tfevents.*")):
        raise ReportError(
            f"No metric logs in {workdir}: training writes TensorBoard event files "
            "(events.out.tfevents.*) there. Train first, or point --workdir at a run's folder."
        )


def _keep_latest(
    by_step: dict[int, tuple[float, float]], step: int, wall_time: float, value: float
) -> None:
    if step not in by_step or wall_time >= by_step[step][0]:
        by_step[step] = (wall_time, value)


def plot_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], path: pathlib.Path) -> None:
    """Loss, top-1 and learning rate against the step, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(5 * len(CURVE_PANELS), 3.8))
    for ax, (title, ylabel, series) in zip(axes, CURVE_PANELS, strict=True):
        for tag, label in series:
            if tag in scalars:
                steps, values = scalars[tag]
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_step(state: Any, counts: Any, batch: dict[str, Any], flip: bool = False) -> Any:
    """`counts` plus this batch's [true, predicted] counts; padded examples count nowhere."""
    import jax
    import jax.numpy as jnp

    from resnet_jax import steps

    logits = steps.predict_logits(
        state.apply_fn,
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        flip,
    )
    num_classes = counts.shape[0]
    truth = jax.nn.one_hot(batch["label"], num_classes) * batch["mask"][:, None]
    predicted = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    # At most a batch per entry: exact in float32, accumulated in int32.
    return counts + jnp.einsum("bi,bj->ij", truth, predicted).astype(jnp.int32)


def confusion_matrix(
    config: Any, workdir: pathlib.Path, which: str, weights: str = "raw"
) -> tuple[np.ndarray, int, Any]:
    """Evaluates checkpoint `which`: the [true, predicted] count matrix, the step, the input.

    `weights` ("raw" or "ema") picks the weights; `config.eval_flip`, flip TTA.
    """
    import jax
    import jax.numpy as jnp

    from resnet_jax import evaluate, sharding, steps

    state, mesh, inputs = evaluate.checkpoint_state(config, workdir, which, weights)
    num_classes = state.params["fc"]["bias"].shape[0]
    step = functools.partial(confusion_step, flip=config.eval_flip)
    step_fn = steps.compile_batch_fn(step, mesh, config)
    counts = jax.jit(
        lambda: jnp.zeros((num_classes, num_classes), jnp.int32),
        out_shardings=sharding.replicated(mesh),
    )()
    progress = None

    def on_batch(done: int, total: int) -> None:
        nonlocal progress
        progress = progress or cli.Progress(total, f"Evaluating step {int(state.step)}", "batches")
        progress.update(done)

    try:
        counts = evaluate.eval_loop(step_fn, counts, state, inputs, config, mesh, on_batch=on_batch)
    finally:
        inputs.close()
    return np.asarray(jax.device_get(counts)), int(state.step), inputs


def per_class_rows(counts: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """One row per class: examples, correct, accuracy, most frequent wrong prediction."""
    rows = []
    for i, name in enumerate(class_names):
        row = counts[i]
        wrong = row.copy()
        wrong[i] = 0
        confused = int(np.argmax(wrong)) if wrong.any() else None
        rows.append(
            {
                "label": i,
                "class": name,
                "examples": int(row.sum()),
                "correct": int(row[i]),
                "accuracy": float(row[i] / row.sum()) if row.sum() else float("nan"),
                "most_confused_with": class_names[confused] if confused is not None else "",
                "confused_count": int(wrong[confused]) if confused is not None else 0,
            }
        )
    return rows


def plot_confusion(counts: np.ndarray, class_names: list[str], path: pathlib.Path) -> None:
    """The confusion matrix with each row divided by its class's examples (recall on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = min(14.0, 4.0 + 0.12 * num_classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(fractions, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if num_classes <= _NAMED_AXES_MAX_CLASSES:
        ax.set_xticks(range(num_classes), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(num_classes), class_names, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    else:
        ax.set_xlabel("predicted class (label index; names in per_class.md)")
        ax.set_ylabel("true class (label index)")
    if num_classes <= _ANNOTATED_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            color = "black" if fractions[i, j] > 0.5 else "white"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    accuracy = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"Confusion matrix: {int(counts.sum())} test images, top-1 {accuracy:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _last(scalars: dict, tag: str) -> str:
    if tag not in scalars:
        return "n/a"
    steps, values = scalars[tag]
    return f"{values[-1]:.4g} (step {steps[-1]})"


def write_report(
    workdir: pathlib.Path,
    out: pathlib.Path,
    config: Any = None,
    which: str = "latest",
    title: str | None = None,
    weights: str = "raw",
) -> dict[str, Any]:
    """Writes the report files into `out`; with `config` None, only the curves.

    `title` names the run in index.md (default: `workdir`). The evaluation reads the
    `weights` ("raw" or "ema") of checkpoint `which`, with flip TTA if `config.eval_flip`.

    Returns:
      What index.md shows, as numbers: {"curves": {tag: last value}, "step", "top1",
      "num_examples", "per_class": [...]} (the last four only with an evaluation).
    """
    out.mkdir(parents=True, exist_ok=True)
    scalars = read_scalars(workdir)
    plot_curves(scalars, out / "curves.png")
    summary: dict[str, Any] = {"curves": {tag: float(v[-1]) for tag, (_, v) in scalars.items()}}
    lines = [
        f"# Report: {title or workdir}\n",
        _markdown_table(
            ["", "value"],
            [
                ["last train loss", _last(scalars, "train_loss")],
                ["last train top-1 (augmented batches)", _last(scalars, "train_top1")],
                ["last test top-1", _last(scalars, "eval_top1")],
                ["last learning rate", _last(scalars, "train_learning_rate")],
            ],
        ),
        "## Training curves\n",
        "![training curves](curves.png)\n",
    ]
    if config is not None:
        counts, step, inputs = confusion_matrix(config, workdir, which, weights)
        names = list(inputs.class_names) if len(inputs.class_names) == len(counts) else []
        names = names or [f"class {i}" for i in range(len(counts))]
        rows = per_class_rows(counts, names)
        top1 = float(np.trace(counts) / counts.sum())
        summary.update(step=step, top1=top1, num_examples=int(counts.sum()), per_class=rows)
        np.savetxt(out / "confusion.csv", counts, fmt="%d", delimiter=",")
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        table = _markdown_table(
            ["label", "class", "examples", "accuracy", "most confused with (count)"],
            [
                [
                    r["label"],
                    r["class"],
                    r["examples"],
                    f"{r['accuracy']:.4f}",
                    f"{r['most_confused_with']} ({r['confused_count']})"
                    if r["confused_count"]
                    else "",
                ]
                for r in sorted(rows, key=lambda r: r["accuracy"])
            ],
        )
        (out / "per_class.md").write_text(
            f"# Per-class test accuracy, checkpoint step {step}\n\nWorst first.\n\n{table}"
        )
        plot_confusion(counts, names, out / "confusion.png")
        setting = (", EMA weights" if weights == "ema" else "") + (
            ", flip TTA" if config.eval_flip else ""
        )
        lines += [
            f"## Evaluation of checkpoint step {step} ({which}{setting})\n",
            f"Top-1 {top1:.4f} on {int(counts.sum())} test images of {config.dataset}.\n",
            "- [per-class accuracy](per_class.md) ([csv](per_class.csv))",
            "- [confusion matrix counts](confusion.csv) (rows: true class, columns: predicted)\n",
            "![confusion matrix](confusion.png)\n",
        ]
    (out / "index.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _run() -> None:
    from resnet_jax import checkpointing, config_checks, data, defaults

    if "://" in FLAGS.workdir:
        raise ReportError(
            f"--workdir {FLAGS.workdir}: the report reads a run on this machine's disk. Copy "
            "the run here first (for gs://, gcloud storage cp -r BUCKET_PATH runs/), then "
            "give that folder."
        )
    workdir = checkpointing.absolute_workdir(FLAGS.workdir)
    if not workdir.is_dir():
        raise ReportError(f"--workdir {FLAGS.workdir} is not a directory.")
    out = pathlib.Path(FLAGS.out) if FLAGS.out else pathlib.Path(workdir) / "report"
    _require_logs(pathlib.Path(workdir))
    try:  # Before the evaluation, so that it is not lost for want of a place to write.
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(
            f"Cannot write the report to {out} ({e.strerror or e}): choose a folder you can "
            "write with --out=DIR."
        ) from e
    config = None
    if not FLAGS.curves_only:
        config = FLAGS.config
        if config is None:
            if not (workdir / "config.json").is_file():
                raise ReportError(
                    f"{workdir} has no config.json (training writes it), so the evaluation "
                    "has no config: give --config, or --curves_only for the curves alone."
                )
            config = defaults.from_workdir(str(workdir))
        if FLAGS.flip is not None:
            config.eval_flip = FLAGS.flip
        config_checks.validate(config)
        data.hide_accelerators_from_tensorflow()
    summary = write_report(
        pathlib.Path(workdir), out, config, FLAGS.checkpoint, FLAGS.workdir, FLAGS.weights
    )
    logging.info("Report written to %s", out / "index.md")
    if "top1" in summary:
        logging.info("Test top-1 of step %d: %.4f", summary["step"], summary["top1"])


def main(argv: list[str]) -> None:
    cli.start_command(argv)
    cli.use_checkout_configs()
    cli.exit_on_user_error(_run, extra=(ReportError,), step_flag="--checkpoint=STEP")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
