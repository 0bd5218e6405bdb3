"""Final test accuracy of finished runs, grouped by budget: the mean and spread over seeds.

    python scripts/summarize_runs.py runs/fmnist_resnet20_* --json_out docs/fashion_mnist/runs.json

Each argument is a training workdir (its config.json and eval_results.json, which
training writes at the end). Runs with the same recipe (every setting but the seed and
those that only decide how a run is logged, saved or fed: BOOKKEEPING) form a group; the
table shows each run (seed, epochs, top-1 of the final checkpoint on the whole test
split, wall time: the time its processes logged, summed, so that a break between a stop and
its resume does not count) and each group's mean and sample standard
deviation, with the settings in which the groups differ. The last line printed is the
JSON.

A workdir without eval_results.json but with its config.json and logs is a run not
finished (still training, or stopped to be resumed): a second table shows how far it has
got, its last logged step and latest evaluation (with the EMA weights' where it keeps
them). Those are progress, not results, and no group includes them.

The final checkpoint's top-1 is the figure to quote. Beside it, each run's best evaluation
during training (the highest `eval_top1` its logs hold, and at which step) is the figure
of scripts that report the best epoch's test accuracy, such as the Random-Erasing code
behind the Fashion-MNIST anchors of configs/fashion_mnist.py: it is picked on the test
set, so it is optimistic, and it is only comparable with such figures. A run that keeps
an EMA of its weights gets the same two figures for them: the final checkpoint's EMA top-1
and the best EMA evaluation.
"""

import argparse
import json
import pathlib
import statistics
import sys

# Settings that decide how a run is logged, saved, evaluated in batches or fed (the data
# order is the same on every input path), not what it trains.
BOOKKEEPING = frozenset(
    {
        "allow_schedule_change",
        "checkpoint_every_steps",
        "cpu_convolutions",
        "data_dir",
        "deterministic",
        "eval_batch_size",
        "eval_checkpoint",
        "eval_every_steps",
        "input",
        "input_workers",
        "keep_checkpoints",
        "log_every_steps",
        "manual_dir",
        "profile_num_steps",
    }
)


# Settings the table shows in columns of their own, left out of a group's `settings`.
COLUMNS = ("model.name", "dataset", "num_epochs", "num_train_steps")


def recipe(config) -> dict:
    """The run's settings as dotted keys, less the seed and BOOKKEEPING."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value

    walk("", config.to_dict())
    return {k: v for k, v in flat.items() if k != "seed" and k not in BOOKKEEPING}


def wall_hours(workdir: pathlib.Path) -> float | None:
    """Hours the run trained: each event file's first-to-last span, summed (None without logs).

    Every start of a run (each resume) writes a new event file, so the time between two
    processes, such as a night between sessions before a resume, does not count. A process's
    start-up before its first event and its work after its last (compiling, restoring, the
    final evaluation and save) are left out too: the figure is a little under the truth.
    """
    from tensorboard.backend.event_processing import event_file_loader

    spans = []
    for path in workdir.glob("events.out.tfevents.*"):
        times = [e.wall_time for e in event_file_loader.EventFileLoader(str(path)).Load()]
        if len(times) > 1:
            spans.append(max(times) - min(times))
    return sum(spans) / 3600 if spans else None


def logged_scalars(workdir: pathlib.Path) -> dict:
    """The run's TensorBoard scalars, {} without logs."""
    from resnet_jax import report

    try:
        return report.read_scalars(workdir)
    except report.ReportError:
        return {}


def best_evaluation(scalars: dict, key: str) -> tuple[float | None, int | None, int]:
    """(highest `key` logged, its step, number of evaluations); (None, None, 0) without."""
    if key not in scalars:
        return None, None, 0
    steps, values = scalars[key]
    best = int(values.argmax())  # The first of equal highs.
    return float(values[best]), int(steps[best]), len(values)


def read_run(workdir: pathlib.Path) -> dict:
    """One finished run's settings, final evaluation and best evaluation during training."""
    from resnet_jax import defaults

    config = defaults.from_workdir(str(workdir))
    results = json.loads((workdir / "eval_results.json").read_text())
    scalars = logged_scalars(workdir)  # Read once: the event files can be large.
    best_top1, best_step, num_evaluations = best_evaluation(scalars, "eval_top1")
    best_ema_top1, best_ema_step, _ = best_evaluation(scalars, "eval_ema_top1")
    return {
        "workdir": str(workdir),
        "model": config.model.name,
        "dataset": config.dataset,
        "train_split": config.train_split,
        "seed": config.seed,
        "num_epochs": config.num_epochs if config.num_train_steps <= 0 else None,
        "steps": results["step"],
        "top1": results["top1"],
        "num_examples": results["num_examples"],
        "best_eval_top1": best_top1,
        "best_eval_step": best_step,
        "num_evaluations": num_evaluations,
        "ema_top1": results.get("ema_top1"),
        "best_eval_ema_top1": best_ema_top1,
        "best_eval_ema_step": best_ema_step,
        "wall_hours": wall_hours(workdir),
        "recipe": recipe(config),
    }


def read_unfinished(workdir: pathlib.Path) -> dict | None:
    """How far a run without a final evaluation has got; None without config and logs."""
    from resnet_jax import defaults, report

    if not (workdir / "config.json").is_file():
        return None
    try:
        scalars = report.read_scalars(workdir)
    except report.ReportError:
        return None
    config = defaults.from_workdir(str(workdir))
    logged = [int(steps[-1]) for steps, _ in scalars.values() if len(steps)]
    latest = {}
    for key in ("eval_top1", "eval_ema_top1"):
        if key in scalars:
            steps, values = scalars[key]
            latest[key] = (int(steps[-1]), float(values[-1]))
    eval_step, eval_top1 = latest.get("eval_top1", (None, None))
    ema_step, ema_top1 = latest.get("eval_ema_top1", (None, None))
    return {
        "workdir": str(workdir),
        "model": config.model.name,
        "seed": config.seed,
        "num_epochs": config.num_epochs if config.num_train_steps <= 0 else None,
        "num_train_steps": config.num_train_steps if config.num_train_steps > 0 else None,
        "logged_step": max(logged) if logged else None,
        "latest_eval_step": eval_step,
        "latest_eval_top1": eval_top1,
        "latest_eval_ema_top1": ema_top1 if ema_step == eval_step else None,
        "wall_hours": wall_hours(workdir),
    }


def unfinished_table(runs: list[dict]) -> str:
    lines = [
        "| run, not finished | model | seed | epochs | steps | last logged step "
        "| latest evaluation: step, top-1 | EMA top-1 | wall time so far |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        hours = f"{r['wall_hours']:.2f} h" if r["wall_hours"] is not None else "?"
        evaluation = (
            f"{r['latest_eval_step']}, {100 * r['latest_eval_top1']:.2f}%"
            if r["latest_eval_top1"] is not None
            else "(none yet)"
        )
        ema = r["latest_eval_ema_top1"]
        lines.append(
            f"| {pathlib.Path(r['workdir']).name} | {r['model']} | {r['seed']} | "
            f"{r['num_epochs'] or ''} | {r['num_train_steps'] or ''} | {r['logged_step'] or ''} | "
            f"{evaluation} | {'' if ema is None else f'{100 * ema:.2f}%'} | {hours} |"
        )
    return "\n".join(lines)


def summarize(runs: list[dict]) -> list[dict]:
    """Groups of runs with the same recipe and steps: mean and sample std of top-1.

    Each group names the settings in which the groups differ (`settings`), less COLUMNS.
    """
    keys = sorted({k for r in runs for k in r["recipe"]})
    differing = [k for k in keys if len({repr(r["recipe"].get(k)) for r in runs}) > 1]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        settings = tuple((k, repr(run["recipe"].get(k))) for k in differing)
        key = (run["model"], run["dataset"], run["train_split"], run["steps"], settings)
        groups.setdefault(key, []).append(run)
    summary = []
    for (model, dataset, split, steps, _), members in sorted(groups.items()):
        top1 = [r["top1"] for r in members]
        best = [r["best_eval_top1"] for r in members]
        ema = [r["ema_top1"] for r in members]
        summary.append(
            {
                "model": model,
                "dataset": dataset,
                "train_split": split,
                "steps": steps,
                "settings": {k: members[0]["recipe"].get(k) for k in differing if k not in COLUMNS},
                "num_epochs": members[0]["num_epochs"],
                "seeds": sorted(r["seed"] for r in members),
                "top1_mean": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
                "best_eval_top1_mean": None if None in best else statistics.mean(best),
                "ema_top1_mean": None if None in ema else statistics.mean(ema),
            }
        )
    return summary


def _ema(run: dict) -> str:
    """A run's EMA figures: final top-1, then its best evaluation (step); '' without an EMA."""
    if run["ema_top1"] is None:
        return ""
    best = run["best_eval_ema_top1"]
    return f"{100 * run['ema_top1']:.2f}%" + (
        "" if best is None else f"; best {100 * best:.2f}% ({run['best_eval_ema_step']})"
    )


def table(runs: list[dict], groups: list[dict]) -> str:
    lines = [
        "| run | model | seed | epochs | steps | test top-1 | examples | wall time "
        "| best evaluation (step, of how many), picked on the test set "
        "| EMA: top-1; best evaluation (step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        hours = f"{r['wall_hours']:.2f} h" if r["wall_hours"] is not None else "?"
        best = (
            f"{100 * r['best_eval_top1']:.2f}% ({r['best_eval_step']}, of {r['num_evaluations']})"
            if r["best_eval_top1"] is not None
            else "(no logs)"
        )
        lines.append(
            f"| {pathlib.Path(r['workdir']).name} | {r['model']} | {r['seed']} | "
            f"{r['num_epochs']} | {r['steps']} | {100 * r['top1']:.2f}% | "
            f"{r['num_examples']:,} | {hours} | {best} | {_ema(r)} |"
        )
    lines += [
        "",
        "| model | settings | epochs | steps | seeds | test top-1, mean | std "
        "| best evaluation, mean | EMA top-1, mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        std = f"{100 * g['top1_std']:.2f}" if g["top1_std"] is not None else "(one run)"
        best = g["best_eval_top1_mean"]
        best = f"{100 * best:.2f}%" if best is not None else "(no logs)"
        settings = ", ".join(f"{k}={v}" for k, v in g["settings"].items()) or "(all alike)"
        ema = "" if g["ema_top1_mean"] is None else f"{100 * g['ema_top1_mean']:.2f}%"
        lines.append(
            f"| {g['model']} | {settings} | {g['num_epochs']} | {g['steps']} | {len(g['seeds'])} | "
            f"{100 * g['top1_mean']:.2f}% | {std} | {best} | {ema} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--json_out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    finished = sorted(w for w in args.workdirs if (w / "eval_results.json").is_file())
    unfinished = [
        run
        for w in sorted(set(args.workdirs) - set(finished))
        if (run := read_unfinished(w)) is not None
    ]
    if not finished and not unfinished:
        sys.exit(
            "error: none of these workdirs holds a finished run (eval_results.json) or one "
            "under way (config.json and TensorBoard logs)."
        )
    runs = [read_run(w) for w in finished]
    groups = summarize(runs) if runs else []
    if runs:
        print(table(runs, groups))
    if unfinished:
        print(("\n" if runs else "") + unfinished_table(unfinished))
    for run in runs:
        del run["recipe"]  # Its differences are each group's settings.
    payload = {"runs": runs, "groups": groups, "unfinished": unfinished}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
