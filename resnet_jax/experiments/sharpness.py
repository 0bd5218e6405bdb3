"""The sharpness of a run's training loss, and the largest learning rate it can take.

    python -m resnet_jax.experiments.sharpness --workdir runs/degradation_fmnist_warmup \
        --runs resnet20,resnet56,resnet110 --checkpoints init,latest

For each run (a subfolder of --workdir, as the degradation experiment makes them) and
each of --checkpoints (`init`: training's own initialisation from the run's seed; or
latest, best, a step), it estimates the largest eigenvalue of the Hessian of the training
loss: the run's cross-entropy, without weight decay, averaged over the first --batches
training batches (those training's first steps see), BatchNorm on batch statistics as in
a training step. The estimate is Lanczos iteration (scipy's ARPACK, from a fixed random
start) on Hessian-vector products (forward-over-reverse differentiation through the
project's compiled fold over the batches), to a relative --tolerance or at most about
--max_products products.

Why it matters: on a quadratic with curvature lambda, SGD with momentum mu (heavy ball, the
project's optimizer) diverges once lr x lambda > 2 (1 + mu). So 2 (1 + mu) / lambda is the
largest stable learning rate near that point; a run whose rate is above it there blows up
or is thrown elsewhere. The table puts it beside the run's learning rate. (Weight decay
adds its coefficient, 1e-4 here, to every eigenvalue: left out.)

It writes into --out (default WORKDIR/sharpness): sharpness.md, a table, and
sharpness.json, the same numbers.
"""

import functools
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
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
    flags.register_validator(
        "checkpoints",
        lambda points: (
            bool(points) and all(p in ("init", "latest", "best") or p.isdigit() for p in points)
        ),
        message="each must be init, latest, best or a step number",
    )
    flags.DEFINE_integer("batches", 2, "First training batches the loss averages over.")
    flags.DEFINE_float("tolerance", 1e-3, "Relative accuracy the eigenvalue is iterated to.")
    flags.DEFINE_integer(
        "max_products", 400, "Most Hessian-vector products per point (each about 3 steps' cost)."
    )
    cli.require_flag(
        "workdir", "the folder of the runs to measure (e.g. --workdir runs/degradation_fmnist)"
    )


def top_eigenvalue(
    hvp: Callable[[np.ndarray], np.ndarray],
    size: int,
    *,
    tolerance: float,
    max_products: int,
    seed: int = 0,
) -> tuple[float, int, bool]:
    """The largest (most positive) eigenvalue of the symmetric operator `hvp` on R^size.

    Lanczos iteration (scipy's ARPACK), which also finds it where an eigenvalue of larger
    magnitude is negative, as it often is at initialisation (plain power iteration would
    find that one). Stops at a relative `tolerance`, or after about `max_products` calls
    of `hvp` (rounded up to whole restarts of 20 Lanczos vectors).

    Returns:
      (the eigenvalue, the products it took, whether it converged). Not converged, the
      eigenvalue is ARPACK's estimate, or nan where it gave none.
    """
    from scipy.sparse import linalg

    products = 0

    def matvec(vector: np.ndarray) -> np.ndarray:
        nonlocal products
        products += 1
        return np.asarray(hvp(np.ravel(vector)), np.float64)

    operator = linalg.LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).normal(size=size)
    basis = min(size - 1, 20)  # Lanczos vectors kept between restarts (ARPACK's ncv).
    try:
        values = linalg.eigsh(
            operator,
            k=1,
            which="LA",
            tol=tolerance,
            v0=start,
            ncv=basis,
            maxiter=max(1, -(-max_products // basis)),
            return_eigenvectors=False,
        )
        return float(values[0]), products, True
    except linalg.ArpackNoConvergence as e:
        if not len(e.eigenvalues):
            return float("nan"), products, False
        return float(e.eigenvalues[0]), products, False


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
    tolerance: float,
    max_products: int,
) -> dict:
    """The sharpness of one run at one point (`which`: init, latest, best or a step)."""
    run = layer_responses.open_run(
        config, workdir, "latest" if which == "init" else which, num_batches
    )
    state = run.initial if which == "init" else run.state
    step_fn = run.compile(functools.partial(hvp_step, loss_fn=run.loss_fn))

    flat, unravel = jax.flatten_util.ravel_pytree(state.params)

    def hvp(vector: np.ndarray) -> np.ndarray:
        tree = unravel(jnp.asarray(vector, flat.dtype))
        carry = (tree, jax.tree.map(jnp.zeros_like, tree))
        for batch in run.train_batches:
            carry = step_fn(state, carry, batch)
        product, _ = jax.flatten_util.ravel_pytree(carry[1])
        return np.asarray(product) / len(run.train_batches)

    top, products, converged = top_eigenvalue(
        hvp, flat.size, tolerance=tolerance, max_products=max_products, seed=config.seed
    )
    if not converged:
        logging.warning(
            "%s, %s: Lanczos did not reach tolerance %g in %d products; the estimate %.4g is "
            "rough (raise --max_products).",
            workdir.name,
            which,
            tolerance,
            products,
            top,
        )
    limit = 2 * (1 + config.momentum) / top if top > 0 else float("inf" if top <= 0 else "nan")
    return {
        "checkpoint": which,
        "step": 0 if which == "init" else int(state.step),
        "top_eigenvalue": top,
        "products": products,
        "converged": converged,
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
    tolerance: float,
    max_products: int,
) -> list[dict]:
    """`measure` of every run at every point, each with the run's name."""
    rows = []
    for name in names:
        config = layer_responses.run_config(root / name)
        for which in checkpoints:
            logging.info("%s, %s: Lanczos iteration ...", name, which)
            row = measure(config, root / name, which, num_batches, tolerance, max_products)
            row = {"run": name, **row}
            logging.info(
                "%s at step %d: top eigenvalue %.4g (%d products), stable up to lr %.4g (the "
                "run's: %.4g).",
                name,
                row["step"],
                row["top_eigenvalue"],
                row["products"],
                row["stable_lr_limit"],
                row["learning_rate"],
            )
            rows.append(row)
    return rows


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| run | point | step | top Hessian eigenvalue | products | stable lr up to "
        "2(1+mu)/lambda | run's peak lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        products = f"{r['products']}" + ("" if r["converged"] else " (not converged)")
        lines.append(
            f"| {r['run']} | {r['checkpoint']} | {r['step']} | {r['top_eigenvalue']:.4g} "
            f"| {products} | {r['stable_lr_limit']:.3g} | {r['learning_rate']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def _run() -> None:
    root = pathlib.Path(FLAGS.workdir).expanduser().absolute()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else root / OUT_DIR
    for flag, value, least in (
        ("batches", FLAGS.batches, 1),
        ("max_products", FLAGS.max_products, 2),
    ):
        if value < least:
            raise LayerResponsesError(f"--{flag}={value}: give at least {least}.")
    if not 0 < FLAGS.tolerance < 1:
        raise LayerResponsesError(f"--tolerance={FLAGS.tolerance}: give a number in (0, 1).")
    names = layer_responses.run_names(root, FLAGS.runs)
    from resnet_jax import data

    data.hide_accelerators_from_tensorflow()
    rows = measure_runs(
        root, names, FLAGS.checkpoints, FLAGS.batches, FLAGS.tolerance, FLAGS.max_products
    )
    out.mkdir(parents=True, exist_ok=True)
    batches = rows[0]["batches"]
    (out / "sharpness.md").write_text(
        f"# Sharpness: {root}\n\nThe largest eigenvalue of the Hessian of the training loss "
        f"(cross-entropy, BN on batch statistics) over the first {batches['count']} training "
        f"batches of {batches['batch_size']}, by Lanczos iteration to a relative tolerance of "
        f"{FLAGS.tolerance:g} (products: Hessian-vector products it took). SGD with momentum mu "
        "diverges on such curvature above lr 2(1+mu)/lambda.\n\n" + table(rows)
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
