"""The degradation experiment (He et al. 2015, figure 6): plain nets get worse with depth.

    python -m resnet_jax.experiments.degradation --workdir runs/degradation

trains plain-N and ResNet-N for every depth of --depths (default 20 and 56) with one
config (default: the paper's CIFAR-10 recipe, configs/paper_cifar10.py, 64k iterations
each), one run after the other, each in WORKDIR/<model> (plain20, resnet20, ...). Every
`--config.key=value` applies to all runs, so any dataset and budget works, for example
a CPU-sized one (docs/results.md has the command that made docs/figures/degradation.png).

Rerunning the command skips the runs that finished with the same config and resumes a
killed one from its last checkpoint. At the end it writes, into WORKDIR (or --out):
- degradation.png: training error (thin) and test error (bold) against iterations,
  plain nets on the left, ResNets on the right, one colour per depth, as in the paper;
- degradation.md: a table of final errors and parameter counts;
- degradation.json: the same numbers, and every curve.
The training error is that of the augmented training batches, as logged during training;
the table's figure is its mean over the last 10% of the iterations (single windows are
noisy).
"""

import json
import pathlib

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from resnet_jax import cli
from resnet_jax.experiments import runner
from resnet_jax.experiments.runner import ExperimentError

cli.use_checkout_configs()

FLAGS = flags.FLAGS
_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
KINDS = ("plain", "resnet")
# Fraction of the iterations at the end over which the final training error is averaged.
FINAL_FRACTION = 0.1


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    config_flags.DEFINE_config_file(
        "config",
        str(_CHECKOUT / "configs" / "paper_cifar10.py"),
        "Config of every run (model.name is set per run).",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Folder of the experiment: one subfolder per run.")
    flags.DEFINE_list("depths", ["20", "56"], "Depths, each 6n + 2 (20, 32, 44, 56, 110).")
    flags.DEFINE_list(
        "kinds",
        list(KINDS),
        "Which panels: plain, resnet or both; e.g. --kinds=resnet for the ResNets alone (a "
        "setting such as model.zero_init_residual that only changes ResNets).",
    )
    flags.DEFINE_string("out", None, "Where the figure and table go (default: --workdir).")
    cli.require_flag(
        "workdir",
        "the experiment's folder, one subfolder per run (e.g. --workdir runs/degradation)",
    )


def run_names(depths: list[int], kinds: tuple[str, ...] = KINDS) -> list[str]:
    """<kind><d> for each kind and depth, plain first."""
    return [f"{kind}{depth}" for kind in kinds for depth in depths]


def parse_kinds(values: list[str]) -> tuple[str, ...]:
    """The --kinds values, in the figure's order (plain, then resnet).

    Raises:
      ExperimentError: a value is neither plain nor resnet, or none is given.
    """
    unknown = [value for value in values if value not in KINDS]
    if unknown or not values:
        raise ExperimentError(f"--kinds: {values} must name plain, resnet or both.")
    return tuple(kind for kind in KINDS if kind in values)


def parse_depths(values: list[str]) -> list[int]:
    """The --depths values as integers of the form 6n + 2.

    Raises:
      ExperimentError: a value is not an integer 6n + 2 with n >= 1.
    """
    depths = []
    for value in values:
        try:
            depth = int(value)
        except ValueError:
            depth = -1
        if depth < 8 or (depth - 2) % 6:
            raise ExperimentError(
                f"--depths: {value!r} is not a depth of the paper's CIFAR nets (6n + 2: 8, 14, "
                "20, 32, 44, 56, 110, ...)."
            )
        depths.append(depth)
    if len(set(depths)) != len(depths):
        raise ExperimentError(f"--depths has a depth twice: {values}.")
    return sorted(depths)


def run_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with model.name = `name` (a copy; the shared config is not changed)."""
    run = ml_collections.ConfigDict(config.to_dict())
    run.model.name = name
    return run


def train_runs(config: ml_collections.ConfigDict, root: pathlib.Path, names: list[str]) -> None:
    """Trains each run of `names` in root/<name>, skipping finished ones (`runner.train_runs`)."""
    runner.train_runs({name: run_config(config, name) for name in names}, root)


def collect(root: pathlib.Path, names: list[str], config: ml_collections.ConfigDict) -> list[dict]:
    """Each run's curves (error = 1 - top-1) and final numbers, read from its logs."""
    from resnet_jax import report, summary

    runs = []
    for name in names:
        scalars = report.read_scalars(root / name)
        for tag in ("train_top1", "eval_top1"):
            if tag not in scalars:
                raise ExperimentError(f"{root / name} has no {tag} logs: rerun the experiment.")
        train_steps, train_top1 = scalars["train_top1"]
        eval_steps, eval_top1 = scalars["eval_top1"]
        last = train_steps[-1]
        tail = train_steps > last * (1 - FINAL_FRACTION)
        results = json.loads((root / name / "eval_results.json").read_text())
        runs.append(
            {
                "model": name,
                "kind": "plain" if name.startswith("plain") else "resnet",
                "depth": int(name.removeprefix("plain").removeprefix("resnet")),
                "params": summary.model_summary(run_config(config, name))["total_params"],
                "steps": int(last),
                "final_train_error": float(1 - train_top1[tail].mean()),
                "final_test_error": float(1 - results["top1"]),
                "best_test_error": float(1 - eval_top1.max()),
                "train_curve": {"step": train_steps.tolist(), "error": (1 - train_top1).tolist()},
                "test_curve": {"step": eval_steps.tolist(), "error": (1 - eval_top1).tolist()},
            }
        )
    return runs


def plot(runs: list[dict], path: pathlib.Path, title: str) -> None:
    """Figure 6's layout: plain | residual, thin = training error, bold = test error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in runs})
    kinds = [kind for kind in KINDS if any(r["kind"] == kind for r in runs)]
    colors = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(depths)}
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(5.5 * len(kinds), 4.2), sharey=True, squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        for run in (r for r in runs if r["kind"] == kind):
            color = colors[run["depth"]]
            train, test = run["train_curve"], run["test_curve"]
            ax.plot(train["step"], 100 * np.array(train["error"]), color=color, lw=0.8, alpha=0.8)
            ax.plot(
                test["step"],
                100 * np.array(test["error"]),
                color=color,
                lw=2.4,
                label=f"{kind}-{run['depth']}",
            )
        ax.set_title("plain networks" if kind == "plain" else "ResNets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, thin: train")
    axes[0][0].set_ylabel("error (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: list[dict]) -> str:
    """Markdown: one row per run, errors in percent."""
    lines = [
        "| model | params | iterations | train error (last 10%) | test error (final) "
        "| test error (best) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['steps']} | {100 * r['final_train_error']:.2f}% "
            f"| {100 * r['final_test_error']:.2f}% | {100 * r['best_test_error']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def run_experiment(
    config: ml_collections.ConfigDict,
    root: pathlib.Path,
    depths: list[int],
    out: pathlib.Path,
    kinds: tuple[str, ...] = KINDS,
) -> list[dict]:
    """Trains what is missing, then writes degradation.{png,md,json} into `out`."""
    names = run_names(depths, kinds)
    train_runs(config, root, names)
    runs = collect(root, names, config)
    out.mkdir(parents=True, exist_ok=True)
    dataset = config.dataset
    if dataset == "image_folder" and config.data_dir:
        dataset = f"{pathlib.Path(config.data_dir).name} (image folder)"
    title = "plain vs residual nets"
    if len(kinds) == 1:
        title = "ResNets" if kinds == ("resnet",) else "plain nets"
    plot(runs, out / "degradation.png", f"{dataset}: {title}, by depth")
    (out / "degradation.md").write_text(table(runs))
    (out / "degradation.json").write_text(
        json.dumps({"dataset": config.dataset, "runs": runs}, indent=1) + "\n"
    )
    return runs


def _run() -> None:
    from resnet_jax import checkpointing

    root = checkpointing.absolute_workdir(FLAGS.workdir)
    out = pathlib.Path(FLAGS.out) if FLAGS.out else pathlib.Path(root)
    depths, kinds = parse_depths(FLAGS.depths), parse_kinds(FLAGS.kinds)
    runs = run_experiment(FLAGS.config, pathlib.Path(root), depths, out, kinds)
    print(table(runs), end="")
    logging.info("Wrote %s, .md and .json.", out / "degradation.png")


if __name__ == "__main__":
    runner.run_command(define_flags, _run)
