"""DenseNet-BC: exact parameter counts (pinned and derived), layout, a train step, bad values."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import checked, count, model_config, run_main, shapes, tiny_state

from configs import densenet_bc100, smoke
from resnet_jax import config_checks, defaults, import_torch, sharding, steps
from resnet_jax.models import create_model, validate_model_config


def densenet_bc_params(depth, growth_rate, num_classes, compression=0.5):
    """Parameters of DenseNet-BC for CIFAR, from the paper's definition alone.

    A 3x3 conv from 3 to 2k channels; three blocks of n = (L - 4) / 6 layers, each
    BN(c) + 1x1 conv c -> 4k + BN(4k) + 3x3 conv 4k -> k (no conv biases), after which
    c grows by k; between blocks BN(c) + 1x1 conv c -> floor(theta c); a last BN(c) and a
    dense layer with bias. A BN has 2 parameters per channel (scale, bias); its running
    mean and variance are statistics, not parameters.

    DenseNet-BC L=100, k=12 (n = 16), CIFAR-10, block by block:
      conv1          3*3*3*24                                              =     648
      block1         c = 24, 36, ..., 204 (sum 1,824):
                     50 * 1,824 (BN 2c + conv 48c) + 16 * (96 + 5,184)     = 175,680
      transition1    c = 216: 2*216 + 216*108                              =  23,760
      block2         c = 108 ... 288 (sum 3,168): 50 * 3,168 + 84,480      = 242,880
      transition2    c = 300: 2*300 + 300*150                              =  45,600
      block3         c = 150 ... 330 (sum 3,840): 50 * 3,840 + 84,480      = 276,480
      bn_final       c = 342: 2*342                                        =     684
      fc             342*10 + 10                                           =   3,430
      total                                                                = 769,162
    With 100 classes the fc has 342*100 + 100 = 34,300: 800,032 in all.
    """
    n = (depth - 4) // 6
    k = growth_rate

    def bn(channels):
        return 2 * channels

    total = 3 * 3 * 3 * 2 * k
    channels = 2 * k
    for block in range(3):
        for _ in range(n):
            total += bn(channels) + channels * 4 * k + bn(4 * k) + 3 * 3 * 4 * k * k
            channels += k
        if block < 2:
            kept = int(compression * channels)
            total += bn(channels) + channels * kept
            channels = kept
    return total + bn(channels) + channels * num_classes + num_classes


# The paper's Table 2 rounds these to 0.8M, 15.3M and 25.6M. 769,162 is also the count
# widely quoted for PyTorch DenseNet-BC-100 k=12 on CIFAR-10 (e.g. the torchvision-style
# CIFAR ports): ours equals it exactly, the layout being the same (3x3 stem conv without
# BN, bias-free convolutions, BN-ReLU-conv order, dense layer with bias).
@pytest.mark.parametrize(
    "depth,growth_rate,num_classes,expected,paper_millions",
    [
        (100, 12, 100, 800_032, 0.8),
        (100, 12, 10, 769_162, 0.8),
        (250, 24, 10, 15_324_406, 15.3),
        (190, 40, 10, 25_624_430, 25.6),
    ],
)
def test_parameter_counts_are_pinned_and_derived(
    depth, growth_rate, num_classes, expected, paper_millions
):
    params = shapes(f"densenet{depth}", num_classes, growth_rate=growth_rate)["params"]
    assert count(params) == expected
    assert densenet_bc_params(depth, growth_rate, num_classes) == expected
    assert round(expected / 1e6, 1) == paper_millions


def test_densenet100_counts_block_by_block():
    # The docstring of densenet_bc_params, layer by layer of the real model.
    params = shapes("densenet100", 10)["params"]
    by_layer = {name: count(sub) for name, sub in params.items()}
    blocks = {
        b: sum(v for name, v in by_layer.items() if name.startswith(f"block{b}_"))
        for b in (1, 2, 3)
    }
    assert blocks == {1: 175_680, 2: 242_880, 3: 276_480}
    assert {name: v for name, v in by_layer.items() if not name.startswith("block")} == {
        "conv1": 648,
        "transition1": 23_760,
        "transition2": 45_600,
        "bn_final": 684,
        "fc": 3_430,
    }


def test_layout_and_names():
    params = shapes("densenet100", 100)["params"]
    assert sorted(params["block1_layer0"]) == ["bn1", "bn2", "conv1", "conv2"]
    # Flax kernels are HWIO; no convolution has a bias.
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 24)
    assert params["block1_layer0"]["conv1"]["kernel"].shape == (1, 1, 24, 48)
    assert params["block1_layer0"]["conv2"]["kernel"].shape == (3, 3, 48, 12)
    assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 216, 108)
    assert params["block3_layer15"]["conv1"]["kernel"].shape == (1, 1, 330, 48)
    assert "block3_layer16" not in params
    assert params["bn_final"]["scale"].shape == (342,)
    assert params["fc"]["kernel"].shape == (342, 100) and params["fc"]["bias"].shape == (100,)
    biases = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == "bias"]
    assert all(p[0].key == "fc" or "bn" in p[-2].key for p in biases)


@pytest.mark.parametrize("depth", [10, 100])
def test_depth_counts_the_weighted_layers(depth):
    # L = 6n + 4: the first conv, two convs per dense layer, two transitions, the fc.
    kernels = jax.tree_util.tree_flatten_with_path(shapes(f"densenet{depth}", 10)["params"])[0]
    assert sum(1 for path, _ in kernels if path[-1].key == "kernel") == depth


def test_width_multiplier_scales_the_growth_rate():
    halved = shapes("densenet16", 10, growth_rate=12, width_multiplier=0.5)["params"]
    assert count(halved) == count(shapes("densenet16", 10, growth_rate=6)["params"])
    assert count(halved) == densenet_bc_params(16, 6, 10)


def test_compression_one_keeps_every_channel():
    params = shapes("densenet16", 10, compression=1.0)["params"]
    assert params["transition1"]["conv"]["kernel"].shape == (1, 1, 48, 48)
    assert count(params) == densenet_bc_params(16, 12, 10, compression=1.0)


def test_an_old_config_without_the_densenet_keys_still_builds():
    # config.json of runs (and checkpoints' metadata) from before DenseNet lack the keys.
    for name, k12 in (("resnet20", False), ("densenet16", True)):
        old = {
            k: v
            for k, v in model_config(name).items()
            if k not in ("growth_rate", "compression", "memory_efficient")
        }
        model = create_model(defaults.saved_config({"model": old}, "an old run").model, 10)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        assert (count(params) == densenet_bc_params(16, 12, 10)) == k12


def tiny_densenet_config(**overrides):
    config = smoke.get_config()
    config.model.name = "densenet10"
    config.model.growth_rate = 4
    config.model.width_multiplier = 1.0
    config.image_size = 8
    for key, value in overrides.items():
        config[key] = value
    return config


def test_one_train_step_moves_params_and_batch_stats():
    config = tiny_densenet_config()
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, lr_fn = tiny_state(config, mesh)
    before = jax.device_get((state.params, state.batch_stats))
    train_step_fn = steps.compile_train_step(config, lr_fn, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 5, 4).astype(np.int32),
    }
    fresh = steps.empty_metrics(steps.TrainMetrics, mesh)
    state, metrics = train_step_fn(state, fresh, sharding.global_batch(batch, mesh))
    loss = steps.read_metrics(metrics)["loss"]
    assert np.isfinite(loss) and loss > 0
    after = jax.device_get((state.params, state.batch_stats))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert all(jax.tree.leaves(moved))  # Every parameter and every BN statistic.


def densenet_in_numpy(variables, images, epsilon, train):
    """DenseNet-BC written out from the paper's definition in numpy: the layer order (BN,
    ReLU, conv), each concatenation's order, the transitions and the head, independently
    of flax. With `train`, BatchNorm uses the batch's statistics (biased variance)."""
    params, stats = variables["params"], variables["batch_stats"]

    def bn(x, p, s):
        if train:
            mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        else:
            mean, var = s["mean"], s["var"]
        return (x - mean) / np.sqrt(var + epsilon) * p["scale"] + p["bias"]

    def conv(x, kernel):  # Stride 1, zero padding of size // 2 on every side (HWIO kernel).
        size = kernel.shape[0]
        pad = size // 2
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        height, width = x.shape[1:3]
        out = 0.0
        for i in range(size):
            for j in range(size):
                window = padded[:, i : i + height, j : j + width, :]
                out = out + np.einsum("nhwc,co->nhwo", window, kernel[i, j])
        return out

    def relu(x):
        return np.maximum(x, 0.0)

    x = conv(images, params["conv1"]["kernel"])
    for block in (1, 2, 3):
        features = [x]
        layer = 0
        while f"block{block}_layer{layer}" in params:
            name = f"block{block}_layer{layer}"
            p, s = params[name], stats[name]
            y = relu(bn(np.concatenate(features, -1), p["bn1"], s["bn1"]))
            y = conv(y, p["conv1"]["kernel"])
            y = conv(relu(bn(y, p["bn2"], s["bn2"])), p["conv2"]["kernel"])
            features.append(y)
            layer += 1
        x = np.concatenate(features, -1)
        if block < 3:
            p, s = params[f"transition{block}"], stats[f"transition{block}"]
            x = conv(relu(bn(x, p["bn"], s["bn"])), p["conv"]["kernel"])
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
    x = relu(bn(x, params["bn_final"], stats["bn_final"])).mean((1, 2))
    return x @ params["fc"]["kernel"] + params["fc"]["bias"]


@pytest.mark.parametrize("train", [False, True])
def test_outputs_equal_a_numpy_densenet_written_from_the_paper(train):
    # Two layers a block, so each concatenation's order matters; random BN scales, biases and
    # statistics, so that a BatchNorm out of place or a ReLU left out changes the logits.
    epsilon = 1e-3
    model = create_model(
        model_config("densenet16", growth_rate=4, bn_epsilon=epsilon), num_classes=5
    )
    images = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    variables = jax.device_get(model.init(jax.random.key(0), images))
    rng = np.random.default_rng(1)

    def randomize(path, x):
        key = jax.tree_util.keystr(path)
        if "var" in key:
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if any(name in key for name in ("mean", "scale", "bias")):
            return rng.uniform(-0.5, 1.0, x.shape).astype(np.float32)
        return np.asarray(x)

    variables = jax.tree_util.tree_map_with_path(randomize, variables)
    with jax.default_matmul_precision("highest"):
        if train:
            logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, images, train=False)
    expected = densenet_in_numpy(variables, images.astype(np.float64), epsilon, train)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("half_precision", [False, True])
def test_dtypes(half_precision):
    # Shapes and dtypes only (eval_shape): nothing to compile.
    config = tiny_densenet_config()
    model = create_model(config.model, 5, half_precision)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, capture_intermediates=True, mutable=["batch_stats", "intermediates"]
        ),
        variables,
        x,
    )
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    conv = state["intermediates"]["block2_layer0"]["conv2"]["__call__"][0]
    assert conv.shape == (2, 4, 4, 4)
    assert conv.dtype == (jnp.bfloat16 if half_precision else jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["batch_stats"]))


def test_the_paper_config():
    for dataset in ("cifar100", "cifar10"):
        config = densenet_bc100.get_config(dataset)
        config_checks.validate(config)
        assert (config.model.name, config.model.growth_rate, config.dataset) == (
            "densenet100",
            12,
            dataset,
        )
        assert (config.batch_size, config.num_epochs, config.lr_decay_epochs) == (
            64,
            300.0,
            (150.0, 225.0),
        )
        assert config.nesterov and config.weight_decay == 1e-4 and config.lr_schedule == "piecewise"
    with pytest.raises(ValueError, match="cifar100 or cifar10"):
        densenet_bc100.get_config("svhn")


def test_summary_command_prints_the_pinned_total():
    result = run_main("--config", "configs/densenet_bc100.py", "--mode=summary")
    assert result.returncode == 0, result.stderr
    assert any(line.split() == ["total", "800,032"] for line in result.stdout.splitlines())
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["model"] == "densenet100" and info["total_params"] == 800_032


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            dict(name="densenet99"),
            r"'densenet99': depth 99 is not of the form 6n \+ 4.*densenet100",
        ),
        (dict(name="densenet4"), r"depth 4 is not of the form 6n \+ 4 with n >= 1"),
        (dict(name="vgg16"), r"Unknown model name 'vgg16'.*plain110.*densenet100.*densenet<L>"),
        (dict(growth_rate=0), r"model.growth_rate=0 must be a positive integer"),
        (dict(growth_rate=-12), r"model.growth_rate=-12 must be a positive integer"),
        (dict(compression=1.5), r"model.compression=1.5 must be in \(0, 1\]"),
        (dict(compression=0.0), r"model.compression=0.0 must be in \(0, 1\]"),
        (
            dict(name="densenet100", zero_init_residual=True),
            r"zero_init_residual=True: densenet100 has no residual.*=False",
        ),
    ],
)
def test_bad_values_are_one_line_errors(overrides, match):
    with pytest.raises(config_checks.ConfigError, match=match) as error:
        checked(**overrides)
    assert "\n" not in str(error.value)


def test_bad_name_on_the_command_line_is_one_line():
    result = run_main(
        "--config", "configs/densenet_bc100.py", "--config.model.name=densenet99", "--mode=summary"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "depth 99 is not of the form 6n + 4" in lines[0], result.stderr


def test_import_torch_refuses_a_densenet_clearly():
    tensors = {"conv1.weight": np.zeros((24, 3, 3, 3), np.float32)}
    with pytest.raises(import_torch.ConversionError, match="only ResNets can be imported"):
        import_torch.import_config("densenet100", tensors, "cifar10")


# scripts/compare_models.py --cpu_remat's compile option: XLA:CPU keeps jax.checkpoint's
# recomputation.
CPU_KEEPS_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def tiny_train_pass(memory_efficient, options=None):
    """densenet16 (k=4) on a 16x16 batch of 4: the initial variables, and a jitted function
    params -> ((loss, (logits, new batch_stats)), grads) in train mode."""
    model = create_model(
        model_config("densenet16", growth_rate=4, memory_efficient=memory_efficient), 10
    )
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = steps.cross_entropy(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=options)
    return variables, grad_fn, loss_fn


def test_memory_efficient_has_the_same_variables_outputs_statistics_and_gradients():
    plain_vars, plain_fn, _ = tiny_train_pass(False)
    lean_vars, lean_fn, _ = tiny_train_pass(True)
    # The same tree, names and shapes, so checkpoints load into either; even the same
    # initial values (the same names draw the same random numbers).
    assert jax.tree.structure(plain_vars) == jax.tree.structure(lean_vars)
    assert jax.tree.map(jnp.shape, plain_vars) == jax.tree.map(jnp.shape, lean_vars)
    jax.tree.map(np.testing.assert_array_equal, plain_vars, lean_vars)
    plain = jax.device_get(plain_fn(plain_vars["params"]))
    lean = jax.device_get(lean_fn(plain_vars["params"]))
    assert jax.tree.structure(plain) == jax.tree.structure(lean)
    # (loss, (logits, batch_stats)), grads: every leaf, every parameter's gradient.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, lean)
    (_, (_, stats)), grads = lean
    assert jax.tree.structure(stats) == jax.tree.structure(plain_vars["batch_stats"])
    assert jax.tree.structure(grads) == jax.tree.structure(plain_vars["params"])
    assert not np.allclose(stats["block1_layer0"]["bn1"]["mean"], 0)  # Statistics did move.


def residual_bytes(loss_fn, params):
    """Bytes of what autodiff keeps from the forward pass for the backward (jaxpr level)."""
    # jax.vjp's backward function is a pytree whose leaves are those residuals.
    backward = jax.eval_shape(lambda p: jax.vjp(lambda q: loss_fn(q)[0], p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))


def test_memory_efficient_keeps_less_for_the_backward_pass():
    plain_vars, plain_fn, plain_loss = tiny_train_pass(False)
    _, lean_fn, lean_loss = tiny_train_pass(True)
    params = plain_vars["params"]
    # What autodiff saves: no concatenation, bn1 or ReLU output of any dense layer.
    assert residual_bytes(lean_loss, params) < 0.8 * residual_bytes(plain_loss, params)

    def temp_bytes(fn):
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(plain_fn)
    kept = temp_bytes(tiny_train_pass(True, CPU_KEEPS_REMAT)[1])
    assert kept < 0.9 * plain, (kept, plain)
    # Without the option XLA:CPU drops jax.checkpoint's barriers before CSE, which merges
    # the recomputation back into the forward pass: no saving. If this starts to fail, XLA
    # keeps it: update the notes (densenet.py, scripts/compare_models.py's --cpu_remat).
    lean = temp_bytes(lean_fn)
    assert abs(lean - plain) < 0.01 * plain, (lean, plain)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_memory_efficient_must_be_a_bool(value):
    # ConfigDict refuses other types for the default's key; a config read back from JSON
    # (a run's config.json) is where another type can come from.
    model = {**model_config("densenet16").to_dict(), "memory_efficient": value}
    with pytest.raises(ValueError, match=rf"model.memory_efficient={value!r} must be True or Fa"):
        validate_model_config(ml_collections.ConfigDict(model))


def test_memory_efficient_is_ignored_by_resnets():
    # Like growth_rate: checked for every model, used by DenseNets only.
    default = shapes("resnet20", 10)
    assert shapes("resnet20", 10, memory_efficient=True) == default
