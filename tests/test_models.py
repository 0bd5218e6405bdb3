"""The model zoo: exact parameter counts, layouts, dtypes and BatchNorm behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import checked, count, model_config, shapes

from resnet_jax import config_checks
from resnet_jax.models import MODEL_NAMES, create_model


def projection_params(params):
    """Parameters of every 1x1-conv + BN projection shortcut."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        int(np.prod(leaf.shape))
        for path, leaf in flat
        if any("downsample" in str(getattr(key, "key", "")) for key in path)
    )


# Counts from ../shared/REFERENCE.md: torchvision's models and the paper's option-A nets.
@pytest.mark.parametrize(
    "name,num_classes,stem,image_size,expected",
    [
        ("resnet18", 100, "cifar", 32, 11_220_132),
        ("resnet18", 1000, "imagenet", 224, 11_689_512),
        ("resnet34", 1000, "imagenet", 224, 21_797_672),
        ("resnet50", 1000, "imagenet", 224, 25_557_032),
        ("resnet101", 1000, "imagenet", 224, 44_549_160),
        ("resnet152", 1000, "imagenet", 224, 60_192_808),
        ("resnet20", 10, "cifar", 32, 269_722),
        ("resnet56", 10, "cifar", 32, 853_018),
        ("resnet110", 10, "cifar", 32, 1_727_962),
    ],
)
def test_parameter_counts(name, num_classes, stem, image_size, expected):
    variables = shapes(name, num_classes, image_size, stem=stem, shortcut="A")
    assert count(variables["params"]) == expected


def test_resnet1202_has_the_papers_19_4m_parameters():
    assert round(count(shapes("resnet1202", 10)["params"]) / 1e6, 1) == 19.4


@pytest.mark.parametrize(
    "depth,stem,shortcut,image_size",
    [
        (18, "cifar", "A", 32),
        (34, "imagenet", "A", 64),
        (50, "imagenet", "A", 64),
        (152, "cifar", "A", 32),
        (20, "cifar", "A", 32),
        (20, "cifar", "B", 32),
        (110, "cifar", "B", 32),
    ],
)
def test_plain_twin_is_the_resnet_minus_its_projections(depth, stem, shortcut, image_size):
    kwargs = dict(stem=stem, shortcut=shortcut)
    residual = shapes(f"resnet{depth}", 10, image_size, **kwargs)["params"]
    plain = shapes(f"plain{depth}", 10, image_size, **kwargs)["params"]
    projections = projection_params(residual)
    if depth in (20, 110) and shortcut == "A":
        assert projections == 0
    else:
        assert projections > 0
    assert count(plain) == count(residual) - projections
    assert projection_params(plain) == 0


def test_option_b_adds_exactly_two_projections_to_resnet20():
    # 16->32: 1x1 conv 512 + BN 64; 32->64: 1x1 conv 2048 + BN 128.
    variables = shapes("resnet20", 10, shortcut="B")
    assert count(variables["params"]) == 269_722 + 576 + 2176


def test_width_multiplier_scales_every_stage():
    params = shapes("resnet20", 10, width_multiplier=2.0)["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert params["layer3_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert params["fc"]["kernel"].shape == (128, 10)


def test_names_follow_torchvision():
    params = shapes("resnet50", 1000, 64, stem="imagenet")["params"]
    block = params["layer2_0"]
    assert sorted(block) == [
        "bn1",
        "bn2",
        "bn3",
        "conv1",
        "conv2",
        "conv3",
        "downsample_bn",
        "downsample_conv",
    ]
    # v1.5: the stride sits on the 3x3 conv; Flax kernels are HWIO.
    assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert block["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert params["fc"]["kernel"].shape == (2048, 1000)


def small_model(name="resnet20", half_precision=False, **overrides):
    overrides.setdefault("width_multiplier", 0.25)
    return create_model(model_config(name, **overrides), 7, half_precision)


def images(batch=4, size=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def test_stems_set_the_feature_map_sizes():
    x = images(size=64)
    for stem, conv1_size, layer1_size in (("imagenet", 32, 16), ("cifar", 64, 64)):
        model = small_model("resnet18", stem=stem, width_multiplier=0.125)
        variables = model.init(jax.random.key(0), x)
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        assert inter["conv1"]["__call__"][0].shape == (4, conv1_size, conv1_size, 8)
        assert inter["layer1_0"]["__call__"][0].shape == (4, layer1_size, layer1_size, 8)


@pytest.mark.parametrize("half_precision", [False, True])
def test_output_shapes_and_dtypes(half_precision):
    model = small_model(half_precision=half_precision)
    x = images()
    variables = model.init(jax.random.key(0), x)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32  # Params and BN statistics stay float32.
    (logits, state) = model.apply(
        variables,
        x,
        train=True,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    assert logits.shape == (4, 7) and logits.dtype == jnp.float32
    compute = jnp.bfloat16 if half_precision else jnp.float32
    assert state["intermediates"]["layer2_0"]["conv1"]["__call__"][0].dtype == compute
    for leaf in jax.tree.leaves(state["batch_stats"]):
        assert leaf.dtype == jnp.float32


def test_bfloat16_logits_are_close_to_float32():
    x = images()
    model32, model16 = small_model(), small_model(half_precision=True)
    variables = model32.init(jax.random.key(0), x)
    out32 = model32.apply(variables, x)
    out16 = model16.apply(variables, x)
    assert not np.array_equal(out32, out16)
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()) + 1e-3)


def test_eval_mode_is_deterministic_and_leaves_batch_stats_unchanged():
    model = small_model()
    x = images()
    variables = model.init(jax.random.key(0), x)
    out1, state = model.apply(variables, x, train=False, mutable=["batch_stats"])
    out2 = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(out1, out2)
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
    # Running statistics, not the batch: one example's logits do not depend on the others.
    np.testing.assert_allclose(model.apply(variables, x[:1])[0], out1[0], rtol=1e-5, atol=1e-6)


def test_train_mode_updates_batch_stats_with_the_configured_momentum():
    model = small_model(bn_momentum=0.75, bn_epsilon=1e-3)
    x = images(batch=8)
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(
        variables,
        x,
        train=True,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    conv1_out = state["intermediates"]["conv1"]["__call__"][0]
    stats = state["batch_stats"]["bn1"]
    # Initial running mean 0, variance 1; new = 0.75 * old + 0.25 * batch statistic.
    np.testing.assert_allclose(
        stats["mean"], 0.25 * conv1_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        stats["var"], 0.75 + 0.25 * conv1_out.var((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), state["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))


def test_batch_norm_epsilon_is_used():
    x = images()
    for epsilon in (1e-5, 10.0):
        model = small_model(bn_epsilon=epsilon)
        variables = model.init(jax.random.key(0), x)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        conv1_out = state["intermediates"]["conv1"]["__call__"][0]
        bn1_out = state["intermediates"]["bn1"]["__call__"][0]
        # Initial statistics (mean 0, variance 1), scale 1, bias 0: x / sqrt(1 + epsilon).
        np.testing.assert_allclose(bn1_out, conv1_out / np.sqrt(1 + epsilon), rtol=1e-5, atol=1e-6)


def test_zero_init_residual_makes_each_block_start_as_the_identity():
    model = small_model(zero_init_residual=True, shortcut="A")
    x = images()
    variables = model.init(jax.random.key(0), x)
    for name in ("layer1_0", "layer2_0", "layer3_2"):
        assert not variables["params"][name]["bn2"]["scale"].any()
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    # layer1_1's input is layer1_0's (non-negative) output: the block passes it through.
    np.testing.assert_allclose(inter["layer1_1"]["__call__"][0], inter["layer1_0"]["__call__"][0])
    # Plain nets have no shortcut to carry the signal, so their last BN keeps scale 1.
    plain = small_model("plain20", zero_init_residual=True)
    plain_params = plain.init(jax.random.key(0), x)["params"]
    assert (plain_params["layer1_0"]["bn2"]["scale"] == 1).all()


def test_option_a_shortcut_zero_pads_new_channels():
    model = small_model(zero_init_residual=True, shortcut="A")
    x = images()
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    block_in = inter["layer1_2"]["__call__"][0]  # 4 channels, 16x16
    block_out = inter["layer2_0"]["__call__"][0]  # 8 channels, 8x8
    # Zero branch: the output is relu(shortcut) = input subsampled, channels 2..5 of 8.
    np.testing.assert_allclose(block_out[..., 2:6], block_in[:, ::2, ::2, :], atol=1e-6)
    assert not block_out[..., :2].any() and not block_out[..., 6:].any()


def weighted_layers(params):
    """Convolutions and dense layers on the main path (projection shortcuts not counted)."""
    return sum(
        1
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if path[-1].key == "kernel" and not any("downsample" in str(k.key) for k in path)
    )


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n[-4:] != "1202"])
def test_every_registered_name_builds_a_net_of_its_depth(name):
    # The paper counts depth as weighted layers: 3x3 stem + 2 (basic) or 3 (bottleneck)
    # per block + fc. resnet1202's 19.4M parameters are pinned in another test.
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    params = shapes(name, 10, shortcut="B")["params"]
    assert weighted_layers(params) == depth
    has_projections = projection_params(params) > 0
    assert has_projections == name.startswith("resnet")  # Plain twins have no shortcut.


def test_any_6n_plus_2_depth_builds():
    # resnet26 is not in the paper's table but is a valid 6n+2 net (n=4).
    params = shapes("resnet26", 10)["params"]
    assert "layer1_3" in params and "layer1_4" not in params


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(name="vgg16"), r"Unknown model name 'vgg16'.*resnet18.*resnet56.*plain110"),
        (dict(name="resnet58"), r"depth 58 .*6n \+ 2.*Valid names"),
        (dict(name="plain21"), r"depth 21 .*6n \+ 2"),
        (dict(num_classes=0), r"model.num_classes=0 must be a positive"),
        (dict(num_classes=-3), r"model.num_classes=-3 must be a positive"),
        (dict(width_multiplier=0.0), r"model.width_multiplier=0.0 must be positive"),
        (dict(width_multiplier=-1.0), r"model.width_multiplier=-1.0 must be positive"),
        (dict(stem="tiny"), r"model.stem='tiny' is not one of \('cifar', 'imagenet'\)"),
        (dict(shortcut="C"), r"model.shortcut='C' is not one of \('A', 'B'\)"),
        (dict(bn_momentum=1.0), r"bn_momentum=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_model_config_is_rejected_with_the_valid_choices(overrides, match):
    with pytest.raises(config_checks.ConfigError, match=match):
        checked(**overrides)


def test_every_shipped_config_is_valid():
    import importlib

    from helpers import ROOT

    # Each config file, with the arguments its docstring names (file.py:ARG).
    arguments = {
        "paper_cifar10": ("20", "56", "110"),
        "fashion_mnist": ("", "quick", "degradation", "degradation6000", "recipes", "anchor"),
    }
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
    assert len(names) >= 11
    for name in names:
        if name == "from_workdir":  # Reads a run's config.json (tests/test_checkpoints.py).
            continue
        module = importlib.import_module(f"configs.{name}")
        for argument in arguments.get(name, (None,)):
            config = module.get_config() if argument is None else module.get_config(argument)
            config_checks.validate(config)
    from configs import (
        fashion_mnist,
        paper_cifar10,
        resnet18,
        resnet18_large_batch,
        resnet50_imagenet,
    )
    from resnet_jax import steps as train_steps

    # The degradation budget and its decays at a half and three quarters of it.
    for argument, steps, decays in (
        ("degradation", 3000, (1500, 2250)),
        ("degradation6000", 6000, (3000, 4500)),
    ):
        config = fashion_mnist.get_config(argument)
        assert (config.num_train_steps, tuple(config.lr_decay_steps)) == (steps, decays)
    with pytest.raises(ValueError, match="degradationN"):
        fashion_mnist.get_config("degradation6k")
    # The 300-epoch anchors' recipe: their ResNet-20 (projection shortcuts, 272,474
    # parameters here, test_option_b_adds_exactly_two_projections_to_resnet20), lr /10 at
    # epochs 150 and 225, every parameter decayed, the test set evaluated every epoch.
    anchor = fashion_mnist.get_config("anchor")
    assert (anchor.model.name, anchor.model.shortcut, anchor.num_epochs) == ("resnet20", "B", 300)
    assert (anchor.lr_schedule, tuple(anchor.lr_decay_epochs)) == ("piecewise", (150.0, 225.0))
    assert (anchor.weight_decay, anchor.weight_decay_all, anchor.random_erasing) == (5e-4, True, 0)
    assert anchor.eval_every_steps == 60_000 // anchor.batch_size
    schedule = train_steps.schedule_settings(anchor, steps_per_epoch=468, num_train_steps=140_400)
    assert (schedule["decay_steps"], schedule["decay_factor"]) == ([70_200, 105_300], 0.1)

    imagenet = resnet50_imagenet.get_config()
    assert imagenet.learning_rate == pytest.approx(0.4)  # 0.1 per 256 examples
    assert (imagenet.input, imagenet.augment, imagenet.eval_split) == (
        "stream",
        "random_resized_crop",
        "validation",
    )
    for depth in ("20", "56", "110"):
        assert paper_cifar10.get_config(depth).model.name == f"resnet{depth}"
    # The large-batch variant: the headline recipe with the learning rate scaled linearly.
    small, large = resnet18.get_config(), resnet18_large_batch.get_config()
    assert large.learning_rate / small.learning_rate == large.batch_size / small.batch_size == 8
    assert (large.half_precision, large.warmup_epochs, large.num_epochs) == (True, 5.0, 200.0)
    assert large.eval_every_steps == 10 * (50_000 // 1024)
