"""The sharpness of a run's training loss, and the largest learning rate it can take.

    python -m resnet_jax.experiments.sharpness --workdir runs/degradation_fmnist_warmup \
        --runs resnet20,resnet56,resnet110 --checkpoints init,latest

For each run (a subfolder of --workdir, as the degradation experiment makes them) and
each of --checkpoints (`init`: training's own initialisation from the run's seed; or
latest, best, a step), it estimates the largest eigenvalue of the Hessian of the training
loss: the run's cross-entropy, without weight decay, averaged over the first --batches
training batches (those training's first steps see), BatchNorm on batch statistics as in
a training step. The estimate is power iteration on Hessian-vector products
(forward-over-reverse differentiation), --iterations of them from a fixed random start
(twice as many where the eigenvalue of largest magnitude is negative: then it shifts the
spectrum by that much and iterates again, to find the most positive one).

Why it matters: on a quadratic with curvature lambda, SGD with momentum mu (heavy ball, the
project's optimizer) diverges once lr x lambda > 2 (1 + mu). So 2 (1 + mu) / lambda is the
largest stable learning rate near that point; a run whose rate is above it there blows up
or is thrown elsewhere. The table puts it beside the run's learning rate. (Weight decay
adds its coefficient, 1e-4 here, to every eigenvalue: left out.)

It writes into --out (default WORKDIR/sharpness): sharpness.md, a table, and
sharpness.json, every estimate of the power iteration too.
"""

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from resnet_jax import cli
from resnet_jax.experiments import layer_responses
from resnet_jax.experiments.layer_responses import LayerResponsesError

FLAGS = flags.FLAGS
OUT_DIR = "sharpness"


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string("workdir", None, "Folder of the runs: one subfolder per run.")
    flags.DEFINE_string("out", None, f"Where the table and JSON go (default: WORKDIR/{OUT_DIR}).")
    flags.DEFINE_list(
        "runs", None, "Runs (subfolders of --workdir); default: every plain<d>/resnet<d>."
    )
    flags.DEFINE_list(
        "checkpoints",
        ["init", "latest"],
        "Points of each run: init (training's initialisation), latest, best or a step.",
    )
    flags.DEFINE_integer("batches", 2, "First training batches the loss averages over.")
    flags.DEFINE_integer("iterations", 20, "Hessian-vector products of the power iteration.")
    cli.require_flag(
        "workdir", "the folder of the runs to measure (e.g. --workdir runs/degradation_fmnist)"
    )


def power_iteration(
    hvp: Callable[[Any], Any], like: Any, iterations: int, seed: int = 0, shift: float = 0.0
) -> list[float]:
    """Rayleigh quotients v.(H + shift I)v, less `shift`, of power iteration on that matrix.

    `hvp` computes v -> Hv over trees like `like`. The last quotient estimates the
    eigenvalue of H whose shifted value has the largest magnitude; the list shows how it
    settled. Starts from a normal random unit vector drawn from `seed`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    vector = treedef.unflatten(
        [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)]
    )
    vector = _scaled(vector, 1.0 / _norm(vector))
    estimates = []
    for _ in range(iterations):
        product = hvp(vector)
        if shift:
            product = jax.tree.map(lambda p, v: p + shift * v, product, vector)
        estimates.append(float(_dot(vector, product)) - shift)
        vector = _scaled(product, 1.0 / _norm(product))
    return estimates


def largest_eigenvalue(
    hvp: Callable[[Any], Any], like: Any, iterations: int, seed: int = 0
) -> tuple[list[float], float | None]:
    """The power iteration's estimates of H's largest (most positive) eigenvalue, and the
    negative eigenvalue found first, if any.

    Plain power iteration finds the eigenvalue of largest magnitude. Where that one is
    negative, a second run on H + |it| I, whose eigenvalues are all >= 0, finds the
    largest: `iterations` more products.
    """
    estimates = power_iteration(hvp, like, iterations, seed)
    if estimates[-1] >= 0:
        return estimates, None
    negative = estimates[-1]
    return power_iteration(hvp, like, iterations, seed, shift=-negative), negative


def _dot(a: Any, b: Any) -> jnp.ndarray:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _norm(a: Any) -> jnp.ndarray:
    return jnp.sqrt(_dot(a, a))


def _scaled(a: Any, factor: jnp.ndarray) -> Any:
    return jax.tree.map(lambda x: x * factor, a)


def hvp_step(
    state: Any, carry: tuple[Any, Any], batch: dict[str, jnp.ndarray], *, loss_fn: Callable
) -> tuple[Any, Any]:
    """(v, sum) -> (v, sum + H v), H the Hessian of one batch's mean loss w.r.t. the params.

    BatchNorm normalises with the batch's statistics, as in a training step.
    """
    vector, total = carry

    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, _ = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
        return loss_fn(logits.astype(jnp.float32), batch["label"]).mean()

    _, product = jax.jvp(jax.grad(loss), (state.params,), (vector,))
    return vector, jax.tree.map(jnp.add, total, product)


def measure(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    which: str,
    num_batches: int,
    iterations: int,
) -> dict:
    """The sharpness of one run at one point (`which`: init, latest, best or a step)."""
    run = layer_responses.open_run(
        config, workdir, "latest" if which == "init" else which, num_batches
    )
    state = run.initial if which == "init" else run.state
    step_fn = run.compile(functools.partial(hvp_step, loss_fn=run.loss_fn))

    def hvp(vector):
        # The compiled step donates its carry: the caller's vector is passed as a copy.
        carry = (jax.tree.map(jnp.copy, vector), jax.tree.map(jnp.zeros_like, vector))
        for batch in run.train_batches:
            carry = step_fn(state, carry, batch)
        return jax.tree.map(lambda x: x / len(run.train_batches), carry[1])

    estimates, negative = largest_eigenvalue(hvp, state.params, iterations, seed=config.seed)
    top = estimates[-1]
    limit = 2 * (1 + config.momentum) / top if top > 0 else float("inf")
    return {
        "checkpoint": which,
        "step": 0 if which == "init" else int(state.step),
        "top_eigenvalue": top,
        # How far the last iteration still moved it: a rough check of convergence.
        "last_change": abs(estimates[-1] - estimates[-2]) / abs(top) if iterations > 1 else None,
        "estimates": estimates,
        # Larger in magnitude than the top one, where found: the loss curves down there.
        "negative_eigenvalue": negative,
        "momentum": config.momentum,
        "stable_lr_limit": limit,
        "learning_rate": config.learning_rate,
        "batches": {"count": num_batches, "batch_size": config.batch_size, "seed": config.seed},
    }


def measure_runs(
    root: pathlib.Path,
    names: Sequence[str],
    checkpoints: Sequence[str],
    num_batches: int,
    iterations: int,
) -> list[dict]:
    """`measure` of every run at every point, each with the run's name."""
    rows = []
    for name in names:
        config = layer_responses.run_config(root / name)
        for which in checkpoints:
            logging.info("%s, %s: %d Hessian-vector products ...", name, which, iterations)
            row = {"run": name, **measure(config, root / name, which, num_batches, iterations)}
            logging.info(
                "%s at step %d: top eigenvalue %.4g, stable up to lr %.4g (the run's: %.4g).",
                name,
                row["step"],
                row["top_eigenvalue"],
                row["stable_lr_limit"],
                row["learning_rate"],
            )
            rows.append(row)
    return rows


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| run | point | step | top Hessian eigenvalue | last change | stable lr limit 2(1+mu)/lambda | run's peak lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = "-" if r["last_change"] is None else f"{100 * r['last_change']:.1f}%"
        lines.append(
            f"| {r['run']} | {r['checkpoint']} | {r['step']} | {r['top_eigenvalue']:.4g} | {change} "
            f"| {r['stable_lr_limit']:.3g} | {r['learning_rate']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def _run() -> None:
    root = pathlib.Path(FLAGS.workdir).expanduser().absolute()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else root / OUT_DIR
    for flag, value, least in (("batches", FLAGS.batches, 1), ("iterations", FLAGS.iterations, 2)):
        if value < least:
            raise LayerResponsesError(f"--{flag}={value}: give at least {least}.")
    names = layer_responses.run_names(root, FLAGS.runs)
    from resnet_jax import data

    data.hide_accelerators_from_tensorflow()
    rows = measure_runs(root, names, FLAGS.checkpoints, FLAGS.batches, FLAGS.iterations)
    out.mkdir(parents=True, exist_ok=True)
    batches = rows[0]["batches"]
    (out / "sharpness.md").write_text(
        f"# Sharpness: {root}\n\nThe largest eigenvalue of the Hessian of the training loss "
        f"(cross-entropy, BN on batch statistics) over the first {batches['count']} training "
        f"batches of {batches['batch_size']}, by {FLAGS.iterations} steps of power iteration; "
        "last change: how much the last step still moved it. SGD with momentum mu diverges on "
        "such curvature above lr 2(1+mu)/lambda.\n\n" + table(rows)
    )
    (out / "sharpness.json").write_text(
        json.dumps({"workdir": str(root), "runs": rows}, indent=1) + "\n"
    )
    print(table(rows), end="")
    logging.info("Wrote %s and .json.", out / "sharpness.md")


def main(argv: list[str]) -> None:
    cli.start_command(argv)
    cli.use_checkout_configs()
    cli.exit_on_user_error(_run, extra=(LayerResponsesError,), step_flag="--checkpoints=STEP")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
