"""cpu_convolutions: what it changes in the compiled program, and that values do not change."""

import json
import re

import jax
import numpy as np
import pytest
from absl import logging

from configs import default, from_workdir
from resnet_jax import compile_options, config_checks, sharding, steps
from resnet_jax.models import create_model


def _config(setting: str):
    config = default.get_config()
    config.model.name = "resnet18"
    config.model.width_multiplier = 0.125  # 8 to 64 channels: every stage, stride and shortcut.
    config.cpu_convolutions = setting
    return config


def _convolutions(hlo: str) -> tuple[int, int]:
    """(convolutions in the program, convolutions inside YNNPACK fusions) of compiled HLO text."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        opened = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if opened:
            name, lines = opened.group(1), []
        elif line.startswith("}") and name:
            bodies[name], name = lines, None
        elif name:
            lines.append(line)
    ynn = {
        called
        for body in bodies.values()
        for line in body
        if "__ynn_fusion" in line
        for called in re.findall(r"calls=%([\w.\-]+)", line)
    }

    def count(names):
        return sum(" convolution(" in line for name in names for line in bodies[name])

    return count(bodies), count(ynn)


def _one_train_step(setting: str):
    """The project's compiled train step, once: (parameter update, loss, HLO convolution counts)."""
    config = _config(setting)
    config.image_size, config.batch_size = 16, 8
    mesh = sharding.make_mesh(jax.devices()[:1])
    lr = steps.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=100)
    model = create_model(config.model, num_classes=10)
    state = steps.create_train_state(config, model, steps.create_optimizer(config, lr), mesh)
    train_step_fn = steps.compile_train_step(config, lr, mesh)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        },
        mesh,
    )
    metrics = steps.empty_metrics(steps.TrainMetrics, mesh)
    hlo = train_step_fn.lower(state, metrics, batch).compile().as_text()
    before = jax.device_get(state.params)
    state, metrics = train_step_fn(state, metrics, batch)  # Donates the old state.
    update = jax.tree.map(lambda new, old: new - old, jax.device_get(state.params), before)
    return update, steps.read_metrics(metrics)["loss"], _convolutions(hlo)


def test_eigen_keeps_the_convolutions_on_xla_and_computes_the_same_step():
    update, loss, (convs, in_ynn) = _one_train_step("eigen")
    ref_update, ref_loss, (ref_convs, ref_in_ynn) = _one_train_step("xla_default")
    # ResNet-18's 20 convolutions (stem, 16 in blocks, 3 projections): forward and both
    # gradients, less the images' gradient.
    assert convs == ref_convs == 3 * 20 - 1
    assert in_ynn == 0
    # What the switch is for: by default this jax hands convolutions to YNNPACK (here 17
    # of the 59 at these small sizes; 53 of 59 at batch 128 and 32 px).
    assert ref_in_ynn > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # The first SGD step moves each parameter by -lr x (gradient + weight decay): equal
    # updates are equal gradients.
    expected = dict(jax.tree_util.tree_leaves_with_path(ref_update))
    for path, got in jax.tree_util.tree_leaves_with_path(update):
        scale = float(np.max(np.abs(expected[path])))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            got, expected[path], atol=1e-4 * scale, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


def test_the_option_is_passed_on_cpu_only_when_asked():
    assert compile_options.cpu_options("eigen") == {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
        )
    }
    assert compile_options.cpu_options("xla_default") is None


def test_a_jaxlib_without_the_option_gets_xla_defaults_with_a_warning(monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setattr(compile_options, "_EIGEN_CONVOLUTIONS", {"xla_cpu_no_such_option": "1"})
    assert compile_options.cpu_options("eigen") is None
    assert len(warnings) == 1 and "cpu_convolutions=eigen has no effect" in warnings[0]
    assert "xla_cpu_no_such_option" in warnings[0]


def test_the_initialisation_compiles_unoptimised_to_the_same_parameters_up_to_rounding():
    assert compile_options.run_once_options() == {"xla_backend_optimization_level": 0}
    config = default.get_config()
    config.model.name, config.model.width_multiplier, config.image_size = "resnet8", 0.25, 8
    model = create_model(config.model, num_classes=3)
    mesh = sharding.make_mesh(jax.devices()[:1])
    lr = steps.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=100)
    state = steps.create_train_state(config, model, steps.create_optimizer(config, lr), mesh)
    key = jax.random.key(config.seed)

    def init(options):
        variables = jax.jit(
            lambda rng: steps.init_variables(model, config.image_size, rng),
            compiler_options=options,
        )(key)
        return jax.tree_util.tree_leaves_with_path(jax.device_get(variables["params"]))

    unoptimised, optimised = init(compile_options.run_once_options()), dict(init(None))
    trained_from = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    assert [path for path, _ in trained_from] == [path for path, _ in unoptimised]
    for (path, got), (_, value) in zip(trained_from, unoptimised, strict=True):
        np.testing.assert_array_equal(got, value, err_msg=jax.tree_util.keystr(path))
    # XLA's optimised program rounds a few values differently (the option is in effect),
    # by at most a float32 step of the largest initial weights.
    differ = 0
    for path, value in unoptimised:
        np.testing.assert_allclose(value, optimised[path], rtol=0, atol=1e-7)
        differ += int(np.sum(value != optimised[path]))
    assert differ > 0


def test_a_jaxlib_without_the_run_once_option_compiles_as_usual_with_a_warning(monkeypatch):
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setattr(compile_options, "_RUN_ONCE", {"xla_cpu_no_such_option": 1})
    assert compile_options.run_once_options() is None
    assert len(warnings) == 1 and "xla_cpu_no_such_option" in warnings[0]
    assert warnings[0].startswith("Compiling the initialisation unoptimised has no effect")
    assert "it compiles with XLA's optimisations" in warnings[0]


def test_an_unknown_setting_is_a_config_error_with_the_choices():
    config = _config("onednn")
    with pytest.raises(config_checks.ConfigError, match=r"'onednn'.*eigen, xla_default"):
        config_checks.validate(config)


def test_a_run_saved_with_the_retired_conv_impl_key_still_loads(tmp_path):
    saved = default.get_config().to_dict()
    del saved["cpu_convolutions"]
    saved["model"]["conv_impl"] = "cpu"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = from_workdir.get_config(str(tmp_path))
    assert config.cpu_convolutions == "eigen" and "conv_impl" not in config.model
    saved["model"]["conv_imp"] = "xla"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="'conv_imp', which resnet_jax/defaults.py does not know"):
        from_workdir.get_config(str(tmp_path))
