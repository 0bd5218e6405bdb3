"""Modern recipes in the step and around it: EMA, SAM, mixed losses, flip TTA, EMA weights read back."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import save_trained, tiny_state

from configs import smoke
from resnet_jax import (
    checkpointing,
    config_checks,
    data,
    evaluate,
    export,
    predict,
    report,
    sharding,
    steps,
    train,
)
from resnet_jax.data import augment
from resnet_jax.experiments import recipes


def tiny_config(**overrides):
    config = smoke.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def random_batch(seed, batch_size=8, size=16, num_classes=5):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


def _normalize(config):
    mean, std = data.normalization(config)
    return lambda images: data.normalize(images, mean, std)


def _train(config, num_steps, num_devices=1):
    """Runs the compiled step on `num_devices`; returns every state (device_get) and the losses."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    state, lr_fn = tiny_state(config, mesh)
    step_fn = steps.compile_train_step(config, lr_fn, mesh)
    states, losses = [jax.device_get(state)], []
    for step in range(num_steps):
        fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
        state, metrics = step_fn(state, fresh, sharding.global_batch(random_batch(step), mesh))
        states.append(jax.device_get(state))
        losses.append(steps.read_metrics(metrics)["loss"])
    return states, losses, lr_fn


EVERYTHING = dict(
    policy="randaugment",
    cutout_size=6,
    random_erasing=0.5,
    mixup_alpha=0.4,
    cutmix_alpha=1.0,
    sam_rho=0.05,
    ema_decay=0.9,
)


def test_one_device_and_four_take_the_same_steps_with_every_option_on():
    """The draws are made for the global batch: the device count changes nothing."""
    one, losses_one, _ = _train(tiny_config(**EVERYTHING), 3)
    four, losses_four, _ = _train(tiny_config(**EVERYTHING), 3, num_devices=4)
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves((one[-1].params, one[-1].ema)),
        jax.tree.leaves((four[-1].params, four[-1].ema)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ema_is_the_hand_computed_average_and_changes_no_training():
    states, losses, _ = _train(tiny_config(ema_decay=0.9), 3)
    expected = {"params": states[0].params, "batch_stats": states[0].batch_stats}
    for t in (1, 2, 3):
        decay = min(0.9, (1 + t) / (10 + t))  # Warm-up: 2/11, 3/12, 4/13.
        model = {"params": states[t].params, "batch_stats": states[t].batch_stats}
        expected = jax.tree.map(lambda e, m, d=decay: d * e + (1 - d) * m, expected, model)
        for a, b in zip(jax.tree.leaves(states[t].ema), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    plain_states, plain_losses, _ = _train(tiny_config(), 3)
    assert plain_states[-1].ema is None
    np.testing.assert_array_equal(losses, plain_losses)
    for a, b in zip(
        jax.tree.leaves(states[-1].params), jax.tree.leaves(plain_states[-1].params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert float(steps.ema_decay_at(jnp.int32(1), 0.9, warmup=False)) == pytest.approx(0.9)
    assert float(steps.ema_decay_at(jnp.int32(1000), 0.9, warmup=True)) == pytest.approx(0.9)


def test_sam_step_equals_a_hand_written_two_step_reference():
    rho, momentum, weight_decay = 0.05, 0.9, 1e-3
    config = tiny_config(sam_rho=rho, momentum=momentum, weight_decay=weight_decay)
    states, losses, lr_fn = _train(config, 2)
    normalize = _normalize(config)
    state = states[0]
    params, batch_stats = state.params, state.batch_stats
    trace = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def reference_step(params, batch_stats, trace, images, labels, lr):
        def loss_fn(p):
            logits, updates = state.apply_fn(
                {"params": p, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
        ascended = jax.tree.map(lambda p, g: p + rho * g / norm, params, grad)
        sharp_grad = jax.grad(lambda p: loss_fn(p)[0])(ascended)
        decayed = jax.tree.map(
            lambda g, p: g + weight_decay * p if p.ndim > 1 else g, sharp_grad, params
        )
        trace = jax.tree.map(lambda t, g: momentum * t + g, trace, decayed)
        params = jax.tree.map(lambda p, t: p - lr * t, params, trace)
        # The BN statistics are those of the first pass, at the unperturbed weights.
        return params, new_stats, trace, loss

    for step in range(2):
        batch = random_batch(step)
        params, batch_stats, trace, loss = reference_step(
            params,
            batch_stats,
            trace,
            normalize(batch["image"]),
            batch["label"],
            lr_fn(step),
        )
        np.testing.assert_allclose(losses[step], loss, rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves((states[step + 1].params, states[step + 1].batch_stats)),
            jax.tree.leaves((params, batch_stats)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_the_mixed_loss_is_the_cross_entropy_of_targets_mixed_as_the_pixels():
    config = tiny_config(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1, seed=3)
    states, losses, _ = _train(config, 2)
    settings = augment.Settings.from_config(config)
    for step in range(2):
        state, batch = states[step], random_batch(step)
        images, weight = augment.augment_batch(
            settings, config.seed, jnp.int32(step), jnp.asarray(batch["image"]), _normalize(config)
        )
        assert 0 < float(weight) < 1
        logits, _ = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        one_hot = optax.smooth_labels(jax.nn.one_hot(batch["label"], 5), 0.1)
        targets = weight * one_hot + (1 - weight) * one_hot[::-1]
        expected = optax.softmax_cross_entropy(logits, targets).mean()
        np.testing.assert_allclose(losses[step], expected, rtol=1e-5)


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror():
    config = tiny_config()
    state, _ = tiny_state(config, sharding.make_mesh(jax.devices()[:1]))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = _normalize(config)(random_batch(0)["image"])
    flipped = steps.predict_logits(state.apply_fn, variables, images, flip=True)
    plain = jax.nn.softmax(steps.predict_logits(state.apply_fn, variables, images))
    mirror = jax.nn.softmax(steps.predict_logits(state.apply_fn, variables, images[:, :, ::-1]))
    np.testing.assert_allclose(jnp.exp(flipped), (plain + mirror) / 2, rtol=1e-5, atol=1e-7)
    symmetric = jnp.concatenate([images[:, :, :8], images[:, :, :8][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(
        jnp.exp(steps.predict_logits(state.apply_fn, variables, symmetric, flip=True)),
        jax.nn.softmax(steps.predict_logits(state.apply_fn, variables, symmetric)),
        rtol=1e-5,
    )


@pytest.fixture(scope="module")
def ema_run(toy_folder, tmp_path_factory):
    """A finished smoke run that kept an EMA (decay 0.9), and its config."""
    workdir = tmp_path_factory.mktemp("ema_run")
    config = tiny_config(
        data_dir=str(toy_folder), num_train_steps=24, eval_every_steps=24, ema_decay=0.9
    )
    results = train.train_and_evaluate(config, str(workdir))
    return workdir, config, results


def test_ema_weights_are_evaluated_beside_raw_and_selectable_by_eval(ema_run):
    workdir, config, results = ema_run
    assert {"top1", "ema_top1", "ema_top5", "ema_loss"} <= set(results)
    ema = config.copy_and_resolve_references()
    ema.eval_weights = "ema"
    evaluated = evaluate.evaluate_checkpoint(ema, str(workdir))
    assert evaluated["weights"] == "ema" and evaluated["step"] == 24
    assert evaluated["top1"] == results["ema_top1"] and evaluated["loss"] == results["ema_loss"]
    assert evaluated["loss"] != results["loss"]  # Not the raw weights.
    written = workdir / "evaluations" / "step_24_ema.json"
    assert json.loads(written.read_text())["top1"] == evaluated["top1"]
    ema.eval_flip = True
    flipped = evaluate.evaluate_checkpoint(ema, str(workdir))
    assert (workdir / "evaluations" / "step_24_ema_flip.json").is_file()
    assert flipped["flip"] and flipped["num_examples"] == evaluated["num_examples"] == 63
    out = workdir / "report"
    summary = report.write_report(workdir, out, ema, "latest", weights="ema")
    assert summary["top1"] == pytest.approx(flipped["top1"], abs=1e-6)
    assert "EMA weights, flip TTA" in (out / "index.md").read_text()


def test_predict_and_export_read_the_ema_weights_and_flip(ema_run, tmp_path):
    workdir, _, _ = ema_run
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)

    def probabilities(classifier, batch):
        return np.asarray(
            [
                [entry["prob"] for entry in sorted(top, key=lambda e: e["label"])]
                for top in classifier.classify(batch, batch_size=4)
            ]
        )

    raw = predict.Classifier(str(workdir))
    averaged = predict.Classifier(str(workdir), weights="ema")
    flipped = predict.Classifier(str(workdir), weights="ema", flip=True)
    ema_probs = probabilities(averaged, images)
    assert not np.allclose(ema_probs, probabilities(raw, images), atol=1e-4)
    np.testing.assert_allclose(
        probabilities(flipped, images),
        (ema_probs + probabilities(averaged, images[:, :, ::-1].copy())) / 2,
        rtol=1e-5,
        atol=1e-6,
    )
    meta = export.export(str(workdir), "latest", ["stablehlo"], tmp_path / "out", weights="ema")
    assert meta["source"]["weights"] == "ema"
    served = export.LOADERS["stablehlo"](tmp_path / "out" / export.FILES["stablehlo"])(images)
    np.testing.assert_allclose(served, ema_probs, atol=1e-4)


def test_ema_asked_of_a_run_without_one_is_a_clear_error(toy_folder, tmp_path):
    config = tiny_config(data_dir=str(toy_folder))
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=3)
    save_trained(tmp_path, state, config, ["red", "green", "blue"])
    with pytest.raises(checkpointing.CheckpointError, match="no moving average.*ema_decay=0"):
        predict.Classifier(str(tmp_path), weights="ema")
    # Resuming it with an EMA switched on is refused the same way, nothing changed.
    resumed = config.copy_and_resolve_references()
    resumed.ema_decay = 0.99
    with pytest.raises(checkpointing.CheckpointError, match="no moving average"):
        train.train_and_evaluate(resumed, str(tmp_path))
    assert checkpointing.complete_steps(tmp_path) == [0]


def test_a_rerun_without_the_runs_ema_is_refused_and_changes_nothing(ema_run, tmp_path):
    # The usual way to lose it: a preempted run rerun without its --config.ema_decay.
    workdir = tmp_path / "run"
    shutil.copytree(ema_run[0], workdir)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    resumed = ema_run[1].copy_and_resolve_references()
    resumed.ema_decay = 0.0
    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(resumed, str(workdir))
    assert str(error.value) == (
        f"The checkpoint at step 24 in {workdir / 'checkpoints'} keeps a moving average of "
        "the weights (ema_decay=0.9), which this config (ema_decay=0) would leave out of "
        "every later checkpoint. Rerun with --config.ema_decay=0.9, as the run was started. "
        "Nothing was changed."
    )
    assert sorted((str(p), p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before


def test_recipe_ablation_trains_each_variant_and_seed_once_and_tabulates_them(toy_folder, tmp_path):
    config = tiny_config(
        data_dir=str(toy_folder), num_train_steps=12, eval_every_steps=12, ema_decay=0.9
    )
    rows = recipes.run_experiment(config, tmp_path, ["baseline", "cutout"], [0, 1], tmp_path)
    runs = json.loads((tmp_path / "recipes.json").read_text())["runs"]
    assert [r["run"] for r in runs] == [
        "baseline_seed0",
        "cutout_seed0",
        "baseline_seed1",
        "cutout_seed1",
    ]
    for run in runs:
        results = json.loads((tmp_path / run["run"] / "eval_results.json").read_text())
        assert (run["top1"], run["ema_top1"], run["steps"]) == (
            results["top1"],
            results["ema_top1"],
            12,
        )
        # Flip TTA of both weights, each read back from its own evaluation file.
        evaluations = tmp_path / run["run"] / "evaluations"
        for key, name in (
            ("flip_top1", "step_12_flip.json"),
            ("ema_flip_top1", "step_12_ema_flip.json"),
        ):
            evaluation = json.loads((evaluations / name).read_text())
            assert evaluation["flip"] and run[key] == evaluation["top1"]
        assert json.loads((evaluations / "step_12_ema_flip.json").read_text())["weights"] == "ema"
        saved = json.loads((tmp_path / run["run"] / "config.json").read_text())
        assert saved["seed"] == run["seed"]
        assert saved["cutout_size"] == (8 if run["variant"] == "cutout" else 0)
    cutout = rows[1]
    assert cutout["top1"] == pytest.approx(np.mean([r["top1"] for r in runs[1::2]]))
    assert cutout["gain_on_baseline"] == pytest.approx(cutout["top1"] - rows[0]["top1"])
    markdown = (tmp_path / "recipes.md").read_text()
    assert "| cutout | cutout_size=8 | 0, 1 |" in markdown and "| EMA flip TTA top-1 |" in markdown
    assert cutout["ema_flip_top1"] == pytest.approx(
        np.mean([r["ema_flip_top1"] for r in runs[1::2]])
    )
    before = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "checkpoints" in p.parts)
    recipes.run_experiment(config, tmp_path, ["baseline", "cutout"], [0, 1], tmp_path)
    after = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "checkpoints" in p.parts)
    assert before == after  # Finished runs and their flip evaluations are not redone.
    shutil.rmtree(tmp_path / "cutout_seed1")
    partial = recipes.run_experiment(
        config, tmp_path, ["baseline", "cutout"], [0, 1], tmp_path, table_only=True
    )
    assert not (tmp_path / "cutout_seed1").exists()  # Not trained again...
    assert partial[0] == rows[0] and partial[1]["seeds"] == [0]  # ...only left out.
    with pytest.raises(recipes.ExperimentError, match="nothing to tabulate"):
        recipes.run_experiment(config, tmp_path / "none", ["baseline"], [0], tmp_path, True)
    with pytest.raises(recipes.ExperimentError, match="--variants"):
        recipes.parse_runs(["baseline", "autoaugment"], ["0"])
    with pytest.raises(recipes.ExperimentError, match="--seeds"):
        recipes.parse_runs(["baseline"], ["0", "x"])
