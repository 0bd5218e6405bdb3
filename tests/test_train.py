"""Train and evaluate: sharded steps, schedules, the optimizer and the end-to-end job."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_main, tiny_state

from configs import default, smoke
from resnet_jax import config_checks, data, evaluate, sharding, steps, train
from resnet_jax.models import create_model


def tiny_config(**overrides):
    config = smoke.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def random_batch(batch_size=8, size=16, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        # uint8, as every input path sends them; the step normalises.
        "image": rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


def test_one_device_and_four_devices_take_the_same_step():
    assert jax.device_count() == 4, "conftest.py sets 4 simulated CPU devices"
    config = tiny_config(weight_decay=1e-3, label_smoothing=0.1, nesterov=True)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices)
        state, lr_fn = tiny_state(config, mesh)
        train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
        losses = []
        for step in range(3):
            batch = sharding.global_batch(random_batch(seed=step), mesh)
            fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
            state, step_metrics = train_step_fn(state, fresh, batch)
            losses.append(steps.read_metrics(step_metrics)["loss"])
        assert len(state.params["conv1"]["kernel"].sharding.device_set) == len(devices)
        results.append((losses, jax.device_get(state.params), jax.device_get(state.batch_stats)))
    (losses1, params1, stats1), (losses4, params4, stats4) = results
    np.testing.assert_allclose(losses1, losses4, rtol=1e-5)
    assert losses1[0] != losses1[2]  # The parameters did move.
    for a, b in zip(
        jax.tree.leaves((params1, stats1)), jax.tree.leaves((params4, stats4)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_half_precision_step_keeps_float32_state_and_a_close_loss():
    mesh = sharding.make_mesh(jax.devices()[:1])
    losses = []
    for half in (False, True):
        config = tiny_config(half_precision=half)
        model = create_model(config.model, 5, config.half_precision)
        lr_fn = steps.create_learning_rate_fn(config, 10, 100)
        tx = steps.create_optimizer(config, lr_fn)
        state = steps.create_train_state(config, model, tx, mesh)
        train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
        fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
        state, step_metrics = train_step_fn(
            state, fresh, sharding.global_batch(random_batch(), mesh)
        )
        for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
            assert leaf.dtype in (jnp.float32, jnp.int32)  # The int32 is optax's step count.
        losses.append(steps.read_metrics(step_metrics)["loss"])
    assert losses[0] != losses[1]  # bfloat16 did change the arithmetic...
    assert losses[1] == pytest.approx(losses[0], rel=0.05)  # ...not the result.


def test_batch_norm_statistics_are_over_the_global_batch():
    config = tiny_config()
    mesh = sharding.make_mesh()
    state, lr_fn = tiny_state(config, mesh)
    batch = random_batch()
    # Darken one device's quarter of the batch: a per-device mean would miss it elsewhere.
    batch["image"][:2] //= 8
    model = create_model(config.model, 5)
    _, updates = model.apply(
        {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)},
        data.normalize(batch["image"], *data.normalization(config)),
        train=True,
        mutable=["batch_stats"],
    )
    train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
    fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
    new_state, _ = train_step_fn(state, fresh, sharding.global_batch(batch, mesh))  # Donates.
    np.testing.assert_allclose(
        new_state.batch_stats["bn1"]["mean"], updates["batch_stats"]["bn1"]["mean"], rtol=1e-5
    )


def schedule(**overrides):
    config = default.get_config()
    config.learning_rate = 0.1
    for key, value in overrides.items():
        config[key] = value
    return steps.create_learning_rate_fn(config, steps_per_epoch=100, num_train_steps=1000)


def test_cosine_schedule_with_warmup():
    lr = schedule(lr_schedule="cosine", warmup_epochs=1.0)
    assert float(lr(0)) == 0.0
    assert float(lr(50)) == pytest.approx(0.05)
    assert float(lr(100)) == pytest.approx(0.1)
    assert float(lr(550)) == pytest.approx(0.05, rel=1e-4)  # Halfway through the cosine.
    assert float(lr(1000)) == pytest.approx(0.0, abs=1e-7)


def test_multistep_schedule_is_the_papers():
    lr = schedule(lr_schedule="multistep", lr_decay_steps=(300, 600), lr_decay_factor=0.1)
    assert [float(lr(s)) for s in (0, 299, 300, 599, 600, 999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


def warnings_of(config, steps_per_epoch, num_train_steps):
    settings = steps.schedule_settings(config, steps_per_epoch, num_train_steps)
    return steps.schedule_warnings(settings, num_train_steps)


def test_a_budget_shorter_than_the_schedule_is_warned_about():
    config = default.get_config()
    config.lr_schedule, config.lr_decay_steps = "multistep", (32000, 48000)
    # The paper's CIFAR-10 decays in a 20k-step run: neither is reached.
    (decays,) = warnings_of(config, 390, 20000)
    assert decays == (
        "The learning rate's decays at steps [32000, 48000] come at or after the run's end "
        "(step 20000), so the rate is never divided there: set --config.lr_decay_steps to "
        "fit the budget if that is not meant."
    )
    (late,) = warnings_of(config, 390, 40000)
    assert "steps [48000]" in late
    assert warnings_of(config, 390, 64000) == []
    # DenseNet's epochs 150 and 225 in a 30-epoch run, and a warmup as long as the run.
    config.lr_schedule, config.lr_decay_epochs = "piecewise", (150.0, 225.0)
    config.warmup_epochs = 30.0
    decays, warmup = warnings_of(config, 10, 300)
    assert "steps [1500, 2250]" in decays and "--config.lr_decay_epochs" in decays
    assert warmup.startswith("The warmup (300 steps) lasts the whole run of 300 steps")
    config.lr_schedule = "cosine"
    assert len(warnings_of(config, 10, 301)) == 0


def test_piecewise_schedule_counts_epochs_from_the_start_warmup_included():
    lr = schedule(
        lr_schedule="piecewise", lr_decay_epochs=(2.0, 5.0), lr_decay_factor=0.2, warmup_epochs=1.0
    )
    assert float(lr(100)) == pytest.approx(0.1)
    assert float(lr(199)) == pytest.approx(0.1)
    assert float(lr(200)) == pytest.approx(0.02)
    assert float(lr(500)) == pytest.approx(0.004)


def test_a_decay_boundary_inside_the_warmup_scales_the_rest_of_it():
    # 100 warmup steps; the first decay at step 50 (inside them), the second at 200.
    lr = schedule(
        lr_schedule="multistep", lr_decay_steps=(50, 200), lr_decay_factor=0.1, warmup_epochs=1.0
    )
    assert [float(lr(s)) for s in (0, 40, 50, 80, 100, 199, 200, 500)] == pytest.approx(
        [0.0, 0.04, 0.005, 0.008, 0.01, 0.01, 0.001, 0.001]
    )


def test_a_constant_warmup_holds_a_tenth_of_the_rate_then_steps_up():
    # The paper's start of ResNet-110: lr 0.01 for the first 100 steps here, then 0.1.
    for name, decay in (("multistep", {"lr_decay_steps": (300, 600)}), ("cosine", {})):
        lr = schedule(
            lr_schedule=name, warmup_epochs=1.0, warmup_kind="constant", warmup_factor=0.1, **decay
        )
        assert [float(lr(s)) for s in (0, 99, 100)] == pytest.approx([0.01, 0.01, 0.1]), name
    lr = schedule(lr_schedule="multistep", lr_decay_steps=(300, 600), warmup_kind="constant")
    assert float(lr(0)) == pytest.approx(0.1)  # No warmup epochs: no warmup of either kind.


def test_the_paper_recipe_starts_resnet110_at_lr_001_for_an_epoch():
    from configs import paper_cifar10

    steps_per_epoch = 50_000 // 128  # 390 full batches of CIFAR-10's training set.
    lr110, lr56 = (
        steps.create_learning_rate_fn(paper_cifar10.get_config(d), steps_per_epoch, 64000)
        for d in ("110", "56")
    )
    assert [float(lr110(s)) for s in (0, 389, 390, 31999, 32000)] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01]
    )
    assert [float(lr56(s)) for s in (0, 390, 32000)] == pytest.approx([0.1, 0.1, 0.01])


def test_only_a_constant_warmup_adds_to_the_schedule_record():
    # A linear warmup's record is the one checkpoints saved before warmup_kind existed.
    config = default.get_config()
    config.warmup_epochs = 1.0
    linear = steps.schedule_settings(config, steps_per_epoch=100, num_train_steps=1000)
    assert linear == {
        "lr_schedule": "cosine",
        "learning_rate": 0.1,
        "warmup_steps": 100,
        "num_train_steps": 1000,
    }
    config.warmup_kind = "constant"
    constant = steps.schedule_settings(config, steps_per_epoch=100, num_train_steps=1000)
    assert constant == {**linear, "warmup_kind": "constant", "warmup_factor": 0.1}


def test_the_metrics_carried_through_the_steps_are_those_of_every_step():
    config = tiny_config()
    mesh = sharding.make_mesh()
    state, lr_fn = tiny_state(config, mesh)
    train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
    carried = steps.empty_metrics(steps.TrainMetrics, mesh)
    separate = []
    for step in range(3):
        batch = sharding.global_batch(random_batch(seed=step), mesh)
        fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
        # The same step twice from one state: once into the running collection, once alone.
        _, alone = train_step_fn(jax.tree.map(jnp.copy, state), fresh, batch)
        separate.append(steps.read_metrics(alone))
        state, carried = train_step_fn(state, carried, batch)
    merged = steps.read_metrics(carried)
    assert merged["loss"] == pytest.approx(np.mean([m["loss"] for m in separate]), rel=1e-6)
    assert merged["top1"] == pytest.approx(np.mean([m["top1"] for m in separate]), rel=1e-6)
    assert merged["learning_rate"] == separate[-1]["learning_rate"]
    assert merged["first_nonfinite_step"] == np.iinfo(np.int32).max
    assert isinstance(merged["loss"], float)  # Plain Python numbers: they print short.


def test_weight_decay_skips_batch_norm_and_biases_unless_asked():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
        "bn": {"scale": jnp.ones(2)},
        "fc": {"bias": jnp.ones(2)},
    }
    grads = jax.tree.map(jnp.zeros_like, params)
    for decay_all, decayed in ((False, {"kernel"}), (True, {"kernel", "scale", "bias"})):
        config = default.get_config()
        config.weight_decay, config.weight_decay_all, config.momentum = 0.01, decay_all, 0.0
        tx = steps.create_optimizer(config, optax.constant_schedule(0.5))
        updates, _ = tx.update(grads, tx.init(params), params)
        for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
            name = path[-1].key
            expected = -0.5 * 0.01 if name in decayed else 0.0
            np.testing.assert_allclose(update, expected, atol=1e-9)


def test_batch_size_not_divisible_by_the_device_count_is_rejected():
    mesh = sharding.make_mesh()
    with pytest.raises(
        config_checks.ConfigError,
        match=r"batch_size=6 is not divisible by the 4 devices.*--config.batch_size=4 or 8",
    ):
        sharding.per_process_batch_size(6, mesh)


def test_num_classes_smaller_than_the_dataset_is_rejected():
    config = tiny_config()
    config.model.num_classes = 3
    assert config_checks.resolve_num_classes(config, 3) == 3
    with pytest.raises(
        config_checks.ConfigError, match=r"model.num_classes=3 but dataset .* has 10 classes"
    ):
        config_checks.resolve_num_classes(config, 10)


def test_evaluation_counts_every_example_exactly_once(cifar):
    root, written = cifar
    config = default.get_config()
    config.model.name, config.model.width_multiplier = "resnet8", 0.25
    config.data_dir, config.manual_dir = str(root / "data"), str(root / "manual")
    config.eval_batch_size = 8  # 37 = 4 * 8 + 5: the last batch is padded.
    mesh = sharding.make_mesh()
    inputs = data.open_input(config, mesh, train=False)
    assert inputs.mode == "device"
    state, lr_fn = tiny_state(config, mesh, num_classes=100)
    eval_step_fn = steps.compile_eval_step(mesh, config)
    results = evaluate.evaluate(eval_step_fn, state, inputs, config, mesh)
    assert results["num_examples"] == 37
    # The same numbers computed directly over the 37 examples, unbatched.
    mean, std = data.normalization(config)
    images = (written["test"]["images"] / 255.0 - mean) / std
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    labels = written["test"]["fine_labels"]
    assert results["top1"] == pytest.approx(float((np.argmax(logits, -1) == labels).mean()))
    expected_loss = float(steps.cross_entropy(logits, jnp.asarray(labels, jnp.int32)).mean())
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_training_on_the_tfds_cifar100_split(cifar, tmp_path):
    root, _ = cifar
    config = tiny_config(
        dataset="cifar100",
        image_size=32,
        crop_padding=4,
        batch_size=16,
        eval_batch_size=8,
        num_train_steps=8,
        log_every_steps=4,
        eval_every_steps=8,
        checkpoint_every_steps=8,
        data_dir=str(root / "data"),
        manual_dir=str(root / "manual"),
    )
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    # 64 train images / batch 16 = 4 steps per epoch; all 37 test images evaluated.
    assert results["step"] == 8 and results["num_examples"] == 37
    written = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert written == results
    assert set(written) >= {"top1", "top5", "loss", "num_examples", "step"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "cifar100"


def scalars(workdir, tag):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in accumulator.Tensors(tag)
    ]


def test_smoke_config_learns_an_image_folder_through_main(toy_folder, tmp_path):
    workdir = tmp_path / "run"
    result = run_main(
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        f"--config.data_dir={toy_folder}",
        "--config.profile_num_steps=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A quiet console: one progress line per log step, no library chatter (Orbax alone
    # wrote ~25 lines per checkpoint, 3 checkpoints here).
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert not [line for line in lines if "orbax" in line or "checkpoint_manager" in line]
    progress = re.findall(r"\] step (\d+)/150 \(\d+%\) loss [\d.]+ top1 [\d.]+ ", result.stderr)
    assert progress == ["25", "50", "75", "100", "125", "150"]
    results = json.loads((workdir / "eval_results.json").read_text())
    assert results["num_examples"] == 3 * 21
    assert results["step"] == 150
    assert results["top1"] >= 0.9
    losses = scalars(workdir, "train_loss")
    assert [step for step, _ in losses] == [25, 50, 75, 100, 125, 150]
    assert losses[-1][1] < 0.5 * losses[0][1]
    assert [step for step, _ in scalars(workdir, "eval_top1")] == [75, 150]
    assert scalars(workdir, "steps_per_sec")  # clu's ReportProgress.
    assert list(workdir.glob("plugins/profile/*/*.xplane.pb"))  # clu's Profile hook.


def test_an_eval_batch_size_that_does_not_divide_fails_before_the_first_step(toy_folder, tmp_path):
    config = tiny_config(eval_batch_size=6, data_dir=str(toy_folder))
    with pytest.raises(
        config_checks.ConfigError, match=r"eval_batch_size=6 is not divisible by the 4 devices"
    ):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # Failed before any step.


def test_diverged_steps_are_never_saved_even_at_a_sigterm(toy_folder, tmp_path, monkeypatch):
    # Diverges within a few steps; the log comes too late (step 20), a SIGTERM asks for a
    # save at step 10.
    config = tiny_config(
        learning_rate=1e12,
        num_train_steps=20,
        log_every_steps=20,
        eval_every_steps=100,
        checkpoint_every_steps=100,
        data_dir=str(toy_folder),
    )
    monkeypatch.setattr(train._StopRequest, "__call__", lambda self, step: step >= 10)
    with pytest.raises(FloatingPointError, match=r"not finite at step \d \(reported at step 10\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_diverging_training_stops_naming_the_step(toy_folder, tmp_path):
    config = tiny_config(
        learning_rate=1e12,
        num_train_steps=20,
        log_every_steps=10,
        eval_every_steps=100,
        data_dir=str(toy_folder),
    )
    with pytest.raises(FloatingPointError, match=r"not finite at step \d+ \(reported at step 10\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_dataset_and_missing_folder_are_clear_errors(tmp_path):
    result = run_main(
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data_dir={tmp_path / 'nowhere'}",
    )
    assert result.returncode == 1
    assert str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr
