"""The recipe ablation: each modern addition alone, then all together, over several seeds.

    python -m resnet_jax.experiments.recipes --workdir runs/recipes_fmnist

trains, for each seed of --seeds and each variant of --variants (default: all of
`VARIANTS`, in order), the base config (default configs/fashion_mnist.py:recipes) with
the variant's changes, one run after the other, each in WORKDIR/<variant>_seed<seed>.
Every `--config.key=value` applies to all runs. Every run keeps an EMA of its weights
when the base config does (the recipes config: decay 0.999), which changes nothing in
its training, so each row reports raw and EMA weights; each final checkpoint is then
evaluated once more with flip test-time augmentation, its raw weights and, where the run
keeps one, its EMA (WORKDIR/<run>/evaluations/).

Rerunning the command skips finished runs and evaluations and resumes a killed run from
its last checkpoint; `--table_only` tabulates the finished runs and trains nothing. At
the end it writes recipes.md (the table) and recipes.json (every run's numbers) into
WORKDIR (or --out). Every figure is the top-1 of the final checkpoint on the whole test
split; the variants share the budget in steps, and the table's throughput column shows
what each costs per step (SAM: two gradients).
"""

import json
import pathlib
import statistics

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from resnet_jax import cli
from resnet_jax.experiments import runner
from resnet_jax.experiments.runner import ExperimentError

cli.use_checkout_configs()

FLAGS = flags.FLAGS
_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]

# Each variant's changes to the base config: mixup and CutMix alpha 1.0 (their papers'
# CIFAR value), random erasing's p=0.5, RandAugment N=2, M=9 (torchvision's defaults),
# Cutout's square half the image side (the Cutout paper's 16 px of 32 px
# CIFAR-10 images); SAM's rho 0.05.
_ALL = {
    "policy": "trivialaugment",
    "random_erasing": 0.5,
    "mixup_alpha": 1.0,
    "cutmix_alpha": 1.0,
    "sam_rho": 0.05,
}
VARIANTS = {
    "baseline": {},
    "mixup": {"mixup_alpha": 1.0},
    "cutmix": {"cutmix_alpha": 1.0},
    "cutout": {"cutout_size": "half"},
    "random_erasing": {"random_erasing": 0.5},
    "randaugment": {"policy": "randaugment"},
    "trivialaugment": {"policy": "trivialaugment"},
    "sam": {"sam_rho": 0.05},
    "all": _ALL,
}


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    config_flags.DEFINE_config_file(
        "config",
        str(_CHECKOUT / "configs" / "fashion_mnist.py") + ":recipes",
        "Base config of every run (each variant changes a few keys, and the seed).",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Folder of the experiment: one subfolder per run.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants, of {', '.join(VARIANTS)}.")
    flags.DEFINE_list("seeds", ["0", "1"], "Seeds; every variant is trained with each.")
    flags.DEFINE_string("out", None, "Where the table goes (default: --workdir).")
    flags.DEFINE_bool(
        "table_only",
        False,
        "Train nothing: tabulate the runs that have finished (for a look while others train).",
    )
    cli.require_flag(
        "workdir", "the experiment's folder, one subfolder per run (e.g. --workdir runs/recipes)"
    )


def parse_runs(variants: list[str], seeds: list[str]) -> tuple[list[str], list[int]]:
    """The --variants and --seeds values, checked.

    Raises:
      ExperimentError: an unknown or repeated variant, or a seed that is not an integer >= 0.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise ExperimentError(
            f"--variants={','.join(variants)}: give distinct names of {', '.join(VARIANTS)}."
        )
    if not seeds or not all(s.isdigit() for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds={','.join(seeds)}: give distinct integers >= 0.")
    return variants, [int(s) for s in seeds]


def variant_config(
    config: ml_collections.ConfigDict, variant: str, seed: int
) -> ml_collections.ConfigDict:
    """`config` with `variant`'s changes and `seed` (a copy; the base is not changed)."""
    run = ml_collections.ConfigDict(config.to_dict())
    for key, value in VARIANTS[variant].items():
        run[key] = run.image_size // 2 if value == "half" else value
    run.seed = seed
    return run


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def evaluate_with_flip(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int, weights: str
) -> dict:
    """Checkpoint `step`'s flip-TTA evaluation of its raw or ema `weights` (made once)."""
    from resnet_jax import evaluate

    flipped = ml_collections.ConfigDict(config.to_dict())
    flipped.eval_flip, flipped.eval_checkpoint, flipped.eval_weights = True, str(step), weights
    path = workdir / evaluate.EVALUATIONS_DIR / evaluate.evaluation_name(step, flipped)
    if path.is_file():
        return json.loads(path.read_text())
    return evaluate.evaluate_checkpoint(flipped, str(workdir))


def collect(root: pathlib.Path, runs: dict[str, tuple[str, int, ml_collections.ConfigDict]]):
    """Each run's final numbers: raw and EMA top-1, without and with flip TTA, and img/s."""
    from resnet_jax import report

    collected = []
    for name, (variant, seed, config) in runs.items():
        results = json.loads((root / name / "eval_results.json").read_text())
        step = results["step"]  # The final checkpoint's.
        flipped = evaluate_with_flip(config, root / name, step, "raw")
        ema_flipped = (
            evaluate_with_flip(config, root / name, step, "ema") if config.ema_decay > 0 else {}
        )
        speed = report.read_scalars(root / name).get("train_examples_per_sec")
        collected.append(
            {
                "run": name,
                "variant": variant,
                "seed": seed,
                "changes": {k: config[k] for k in VARIANTS[variant]},
                "steps": results["step"],
                "top1": results["top1"],
                "ema_top1": results.get("ema_top1"),
                "flip_top1": flipped["top1"],
                "ema_flip_top1": ema_flipped.get("top1"),
                "num_examples": results["num_examples"],
                # The first interval holds the compilation: left out when there are others.
                "examples_per_sec": float(
                    statistics.mean(speed[1][1:] if len(speed[1]) > 1 else speed[1])
                )
                if speed
                else None,
            }
        )
    return collected


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(collected: list[dict]) -> list[dict]:
    """One row per variant (in the order run): means over its seeds, and the gain on baseline."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in collected):
        members = [r for r in collected if r["variant"] == variant]
        row = {
            "variant": variant,
            "changes": members[0]["changes"],
            "seeds": [r["seed"] for r in members],
        }
        for key in ("top1", "ema_top1", "flip_top1", "ema_flip_top1", "examples_per_sec"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in members])
        rows.append(row)
    baseline = next((r for r in rows if r["variant"] == "baseline"), None)
    for row in rows:
        row["gain_on_baseline"] = row["top1"] - baseline["top1"] if baseline else None
    return rows


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def table(rows: list[dict]) -> str:
    """Markdown: top-1 (mean ± sample std over seeds), raw and EMA, without and with flip TTA."""
    lines = [
        "| variant | changes | seeds | top-1 | gain on baseline | EMA top-1 | flip TTA top-1 "
        "| EMA flip TTA top-1 | img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(the base config)"
        gain = "" if r["gain_on_baseline"] is None else f"{100 * r['gain_on_baseline']:+.2f}"
        speed = "" if r["examples_per_sec"] is None else f"{r['examples_per_sec']:.0f}"
        lines.append(
            f"| {r['variant']} | {changes} | {', '.join(map(str, r['seeds']))} | "
            f"{_percent(r['top1'], r['top1_std'])} | {gain} | "
            f"{_percent(r['ema_top1'], r['ema_top1_std'])} | "
            f"{_percent(r['flip_top1'], r['flip_top1_std'])} | "
            f"{_percent(r['ema_flip_top1'], r['ema_flip_top1_std'])} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def run_experiment(
    config: ml_collections.ConfigDict,
    root: pathlib.Path,
    variants: list[str],
    seeds: list[int],
    out: pathlib.Path,
    table_only: bool = False,
) -> list[dict]:
    """Trains and evaluates what is missing, then writes recipes.{md,json} into `out`.

    With `table_only`, nothing is trained: the table holds the runs that have finished.

    Raises:
      ExperimentError: `table_only`, and no run has finished.
    """
    runs = {run_name(v, s): (v, s, variant_config(config, v, s)) for s in seeds for v in variants}
    if table_only:
        runs = {n: r for n, r in runs.items() if runner.is_finished(root / n, r[2])}
        if not runs:
            raise ExperimentError(f"No run in {root} has finished yet: nothing to tabulate.")
    else:
        runner.train_runs({name: c for name, (_, _, c) in runs.items()}, root)
    collected = collect(root, runs)
    rows = summarize(collected)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.md").write_text(table(rows))
    (out / "recipes.json").write_text(
        json.dumps({"rows": rows, "runs": collected}, indent=1) + "\n"
    )
    return rows


def _run() -> None:
    from resnet_jax import checkpointing

    root = pathlib.Path(checkpointing.absolute_workdir(FLAGS.workdir))
    out = pathlib.Path(FLAGS.out) if FLAGS.out else root
    variants, seeds = parse_runs(FLAGS.variants, FLAGS.seeds)
    rows = run_experiment(FLAGS.config, root, variants, seeds, out, FLAGS.table_only)
    print(table(rows), end="")
    logging.info("Wrote %s and recipes.json.", out / "recipes.md")


if __name__ == "__main__":
    runner.run_command(define_flags, _run)
