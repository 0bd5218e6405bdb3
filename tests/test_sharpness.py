"""The sharpness command: power iteration against known spectra and against scipy's Lanczos.

The command runs Hessian-vector products through the project's compiled fold on four
devices; the test computes its own on one device (jax.jvp of jax.grad of the model's loss)
and hands them to scipy.sparse.linalg.eigsh.
"""

import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_module
from scipy.sparse.linalg import LinearOperator, eigsh

from resnet_jax import data, evaluate, sharding, train
from resnet_jax.experiments import degradation, sharpness
from resnet_jax.models import create_model

STEPS = 6


def test_the_top_eigenvalue_of_a_known_matrix_even_below_a_larger_negative_one():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    spectrum = np.concatenate([[-9.0, 4.0, 3.0], rng.uniform(-1, 1, 37)])
    matrix = basis @ np.diag(spectrum) @ basis.T
    top, products, converged = sharpness.top_eigenvalue(
        lambda v: matrix @ v, 40, tolerance=1e-8, max_products=400
    )
    assert top == pytest.approx(4.0, rel=1e-6)  # Not -9, the largest in magnitude.
    assert converged and 2 <= products <= 400
    # Too few products for a top eigenvalue among 298 close ones: marked as not converged.
    basis, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    spectrum = np.concatenate([[-9.0, 4.0], rng.uniform(3.0, 3.999, 298)])
    matrix = basis @ np.diag(spectrum) @ basis.T
    top, products, converged = sharpness.top_eigenvalue(
        lambda v: matrix @ v, 300, tolerance=1e-12, max_products=2
    )
    assert not converged and products <= 40  # About one restart: 20 Lanczos vectors.
    assert np.isnan(top) or 3.0 < top <= 4.0 + 1e-9


@pytest.fixture(scope="module")
def measured(tmp_path_factory, toy_folder):
    """resnet8 trained a few steps, measured at its initialisation and its last checkpoint."""
    from configs import smoke

    root = tmp_path_factory.mktemp("sharpness")
    config = degradation.run_config(smoke.get_config(), "resnet8")
    config.data_dir = str(toy_folder)
    config.num_train_steps = STEPS
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = STEPS
    train.train_and_evaluate(config, str(root / "resnet8"))
    result = run_module(
        "resnet_jax.experiments.sharpness",
        f"--workdir={root}",
        "--checkpoints=init,latest",
        "--batches=1",
        "--tolerance=1e-4",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((root / "sharpness" / "sharpness.json").read_text())["runs"]
    return root, config, rows, result


def _lanczos_top_eigenvalue(config, variables, batch):
    """The largest Hessian eigenvalue of one batch's loss, by scipy on one device."""
    classes = variables["params"]["fc"]["bias"].shape[0]
    model = create_model(config.model, classes, config.half_precision)
    mean, std = data.normalization(config)
    images = (batch["image"].astype(jnp.float32) / 255.0 - mean) / std

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])
    hvp = jax.jit(
        lambda v: jax.flatten_util.ravel_pytree(
            jax.jvp(jax.grad(loss), (variables["params"],), (unravel(v),))[1]
        )[0]
    )
    operator = LinearOperator(
        (flat.size, flat.size), matvec=lambda v: np.asarray(hvp(jnp.asarray(v, jnp.float32)))
    )
    return float(eigsh(operator, k=1, which="LA", tol=1e-5, return_eigenvectors=False)[0])


def test_the_top_eigenvalue_is_scipys_at_init_and_at_the_checkpoint(measured, toy_folder):
    root, config, rows, _ = measured
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("init", 0), ("latest", STEPS)]
    # The first training batch, as the command reads it (one device here, the same images).
    mesh = sharding.make_mesh()
    batches = data.open_input(config, mesh).train_batches(config.batch_size, 0)
    batch = jax.device_get(next(batches))
    batches.close()
    state, _, _ = evaluate.checkpoint_state(config, root / "resnet8", "latest")
    from resnet_jax import steps

    tx = steps.create_optimizer(config, optax.constant_schedule(0.0))
    model = create_model(config.model, state.params["fc"]["bias"].shape[0], config.half_precision)
    initial = steps.create_train_state(config, model, tx, mesh)
    for row, point in zip(rows, (initial, state), strict=True):
        variables = {"params": point.params, "batch_stats": point.batch_stats}
        expected = _lanczos_top_eigenvalue(config, variables, batch)
        assert row["top_eigenvalue"] == pytest.approx(expected, rel=1e-3), row["checkpoint"]
        assert row["converged"] and row["products"] >= 2
        assert row["stable_lr_limit"] == pytest.approx(
            2 * (1 + config.momentum) / row["top_eigenvalue"]
        )


def test_the_table_shows_the_json(measured):
    root, _, rows, result = measured
    text = (root / "sharpness" / "sharpness.md").read_text()
    for row in rows:
        assert (
            f"| resnet8 | {row['checkpoint']} | {row['step']} | {row['top_eigenvalue']:.4g} |"
            in text
        )
    assert "| resnet8 | latest |" in result.stdout


def test_a_bad_tolerance_is_one_line(measured):
    root, _, _, _ = measured
    result = run_module(
        "resnet_jax.experiments.sharpness", f"--workdir={root}", "--tolerance=2", timeout=120
    )
    assert result.returncode != 0
    assert "--tolerance=2.0: give a number in (0, 1)." in result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_checkpoint_is_refused_before_any_measurement(measured):
    root, _, _, _ = measured
    result = run_module(
        "resnet_jax.experiments.sharpness",
        f"--workdir={root}",
        "--checkpoints=init,lastest",
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: flag --checkpoints=['init', 'lastest']: each must be init, latest, best or a "
        "step number (see --help for the flags)."
    )
