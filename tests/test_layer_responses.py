"""Figure 7 and the gradient norms on two tiny trained runs, against the numbers computed here.

The command finds its layers by tracing (a BatchNorm fed by a 3x3 convolution) and
streams masked moments over the padded eval batches on four devices; the test takes the
BatchNorm outputs by name with flax's capture_intermediates over every test image at
once, and the gradients with jax.grad on one device.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_module
from PIL import Image

from resnet_jax import data, evaluate, sharding, train
from resnet_jax.experiments import degradation, layer_responses
from resnet_jax.models import create_model

STEPS = 6
GRADIENT_BATCHES = 2
RUNS = ("plain8", "resnet8")
# resnet8: the stem, then one basic block of two 3x3 convs in each of three stages.
LAYERS = ["conv1"] + [f"layer{stage}_0/conv{k}" for stage in (1, 2, 3) for k in (1, 2)]


def run_command(*args):
    return run_module("resnet_jax.experiments.layer_responses", *args, timeout=300)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, toy_folder):
    """A degradation experiment's folder (plain8, resnet8 trained a few steps), analysed."""
    from configs import smoke

    root = tmp_path_factory.mktemp("degradation")
    for name in RUNS:
        config = degradation.run_config(smoke.get_config(), name)
        config.data_dir = str(toy_folder)
        # Option B: the projection shortcuts' BatchNorms are there, and must be left out.
        config.model.shortcut = "B"
        config.num_train_steps = STEPS
        config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = STEPS
        # 63 test images in batches of 16: the last batch is padded and masked.
        config.eval_batch_size = 16
        train.train_and_evaluate(config, str(root / name))
    out = root / "figures"
    result = run_command(
        f"--workdir={root}", f"--out={out}", f"--gradient_batches={GRADIENT_BATCHES}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "layer_responses.json").read_text())["runs"]
    return root, out, result, runs


def _checkpoint(root, name):
    from configs import from_workdir

    config = from_workdir.get_config(str(root / name))
    state, _, _ = evaluate.checkpoint_state(config, root / name, "latest")
    return config, {"params": state.params, "batch_stats": state.batch_stats}


def _normalized(images, config):
    mean, std = data.normalization(config)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def _test_images(folder):
    files = sorted((folder / "test").glob("*/*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _kernel(tree, name):
    for key in name.split("/"):
        tree = tree[key]
    return tree["kernel"]


def _gradient_norms(model, config, variables, batches):
    """Mean over `batches` of each 3x3 kernel's cross-entropy gradient norm, BN in train mode."""
    mean, std = data.normalization(config)

    def loss(params, batch_stats, batch):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            (batch["image"].astype(jnp.float32) / 255.0 - mean) / std,
            train=True,
            mutable=["batch_stats"],
        )
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return cross_entropy.mean(), logits

    total, losses, logit_stds = np.zeros(len(LAYERS)), [], []
    grad_fn = jax.jit(jax.grad(loss, has_aux=True))  # On one device: no sharding, no carry.
    for batch in batches:
        grads, logits = grad_fn(variables["params"], variables["batch_stats"], batch)
        total += [np.linalg.norm(np.asarray(_kernel(grads, n), np.float64)) for n in LAYERS]
        losses.append(loss(variables["params"], variables["batch_stats"], batch)[0])
        logit_stds.append(np.std(np.asarray(logits, np.float64)))
    return total / len(batches), np.mean(losses), np.mean(logit_stds)


def test_stds_are_those_of_each_3x3_layers_bn_output_over_the_test_set(experiment, toy_folder):
    root, _, _, runs = experiment
    images = _test_images(toy_folder)
    assert len(images) == 63
    for run in runs:
        assert run["num_layers"] == 7 and run["layers"] == LAYERS
        assert run["test_examples"] == 63 and run["step"] == STEPS
        config, variables = _checkpoint(root, run["run"])
        model = create_model(config.model, 3)

        def is_response(module, method):
            # A basic block's bn1/bn2 and the stem's bn1; not the projection's downsample_bn.
            return isinstance(module, nn.BatchNorm) and module.name in ("bn1", "bn2")

        _, captured = model.apply(
            variables,
            jnp.asarray(_normalized(images, config)),
            train=False,
            capture_intermediates=is_response,
            mutable=["intermediates"],
        )
        stds, channel_stds = [], []
        for name in LAYERS:
            tree = captured["intermediates"]
            for key in name.replace("conv", "bn").split("/"):
                tree = tree[key]
            response = np.asarray(tree["__call__"][0], np.float64)
            stds.append(response.std())
            channel_stds.append(response.std(axis=(0, 1, 2)).mean())
        if run["kind"] == "resnet":
            assert "downsample_bn" in variables["params"]["layer2_0"]  # Left out above.
        np.testing.assert_allclose(run["std"], stds, rtol=1e-4)
        np.testing.assert_allclose(run["channel_std"], channel_stds, rtol=1e-4)
        assert run["mean_std"] == pytest.approx(np.mean(stds), rel=1e-4)


def test_gradient_norms_are_those_of_the_first_training_batches(experiment):
    root, _, _, runs = experiment
    for run in runs:
        config, trained = _checkpoint(root, run["run"])
        model = create_model(config.model, 3)
        mesh = sharding.make_mesh()
        batches = data.open_input(config, mesh).train_batches(
            sharding.per_process_batch_size(config.batch_size, mesh), 0
        )
        batches = [jax.device_get(next(batches)) for _ in range(GRADIENT_BATCHES)]
        image = jnp.zeros((1, config.image_size, config.image_size, 3))
        initial = model.init(jax.random.key(config.seed), image, train=False)

        at_init, loss_init, logits_init = _gradient_norms(model, config, initial, batches)
        at_end, loss_end, logits_end = _gradient_norms(model, config, trained, batches)
        assert run["loss_init"] == pytest.approx(loss_init, rel=1e-4)
        assert run["logit_std_init"] == pytest.approx(logits_init, rel=1e-4)
        assert run["loss_end"] == pytest.approx(loss_end, rel=1e-4)
        assert run["logit_std_end"] == pytest.approx(logits_end, rel=1e-4)
        np.testing.assert_allclose(run["grad_norm_init"], at_init, rtol=1e-4)
        np.testing.assert_allclose(run["grad_norm_end"], at_end, rtol=1e-4)
        assert run["grad_ratio_init"] == pytest.approx(at_init[0] / at_init[-1], rel=1e-4)
        assert run["grad_ratio_end"] == pytest.approx(at_end[0] / at_end[-1], rel=1e-4)


def test_figure_table_and_json_show_the_same_numbers(experiment):
    root, out, result, runs = experiment
    assert [r["run"] for r in runs] == list(RUNS)
    assert [(r["kind"], r["depth"]) for r in runs] == [("plain", 8), ("resnet", 8)]
    figure = layer_responses.responses_figure(runs)
    by_layer, by_size = figure.axes
    for run, in_order, ranked in zip(runs, by_layer.lines, by_size.lines, strict=True):
        assert run["std_sorted"] == sorted(run["std"], reverse=True)
        np.testing.assert_array_equal(in_order.get_ydata(), run["std"])
        np.testing.assert_array_equal(ranked.get_ydata(), sorted(run["std"], reverse=True))
        np.testing.assert_array_equal(in_order.get_xdata(), np.arange(1, 8))
        assert in_order.get_linestyle() == ("--" if run["kind"] == "plain" else "-")
    table = (out / "layer_responses.md").read_text()
    assert layer_responses.table(runs) in table and layer_responses.table(runs) in result.stdout
    for run in runs:
        assert f"| {run['run']} | {STEPS} | 7 | {run['mean_std']:.4g} |" in table
    for name in ("layer_responses.png", "gradient_norms.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 900


def test_a_missing_run_is_one_line(experiment):
    root, *_ = experiment
    result = run_command(f"--workdir={root}", "--runs=plain8,plain20")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: No run plain20 in {root}"), last
    assert "--runs" in last
    result = run_command(f"--workdir={root}", "--checkpoint=lastest")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: flag --checkpoint=lastest: must be latest, best or a step number (see --help "
        "for the flags)."
    )


def test_a_streamed_evaluation_stops_its_workers_once_folded(experiment):
    """On the streaming path the test set is read by grain workers, stopped after the fold."""
    import multiprocessing

    root, *_ = experiment
    config = layer_responses.run_config(root / "resnet8")
    config.input, config.input_workers = "stream", 1
    before = set(multiprocessing.active_children())  # Another test's, in this process.
    run = layer_responses.open_run(config, root / "resnet8", "latest", GRADIENT_BATCHES)
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    layers = layer_responses.find_layers(run.state.apply_fn, variables, config.image_size)
    assert set(multiprocessing.active_children()) <= before  # The train batches' worker.
    moments = run.fold_test_set(
        run.compile(layer_responses.response_step), layer_responses.empty_moments(layers)
    )
    assert int(moments.examples) == 63
    assert set(multiprocessing.active_children()) <= before
