"""The model registry: a name in the config selects a network.

Names:
- resnet18, resnet34, resnet50, resnet101, resnet152: the torchvision family, with the
  stem chosen by `model.stem` ("cifar" or "imagenet").
- resnet<depth> with depth = 6n + 2 (resnet20/32/44/56/110/1202 in the paper, any n >= 1
  accepted): the paper's CIFAR nets, 16/32/64 filters, shortcut `model.shortcut` (A or B).
  Depths 50 and 152 are 6n + 2 too; those names mean the bottleneck nets above.
- plain<depth>: the same net as resnet<depth> with every shortcut removed.
- densenet<L> with L = 6n + 4 (densenet100, densenet190, densenet250 in the paper, any
  n >= 1 accepted): DenseNet-BC for CIFAR (Huang et al. 2017), growth rate
  `model.growth_rate` (k) and transition compression `model.compression` (theta).

How the ResNet settings apply to a DenseNet:
- `width_multiplier` scales the growth rate (k x multiplier, rounded, at least 1): every
  width of a DenseNet-BC is a multiple of k, so this scales the whole net as it does a
  ResNet. Prefer setting `growth_rate` itself; the two multiply.
- `zero_init_residual=True` is refused: a DenseNet has no residual branch to start as the
  identity (plain nets accept and ignore it, to stay the twin of a ResNet config).
- `stem` and `shortcut` are ignored: DenseNet-BC has one CIFAR layout and no shortcuts.
"""

import functools
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

from resnet_jax.models.densenet import DenseNet
from resnet_jax.models.resnet import BasicBlock, Bottleneck, ResNet

# depth -> (block, blocks per stage), as in torchvision.
TORCHVISION_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
PAPER_CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
STEMS = ("cifar", "imagenet")
SHORTCUTS = ("A", "B")
# The ResNets and their plain twins; the DenseNets are listed apart (DENSENET_NAMES).
MODEL_NAMES = tuple(
    f"{kind}{depth}"
    for kind in ("resnet", "plain")
    for depth in sorted((*TORCHVISION_DEPTHS, *PAPER_CIFAR_DEPTHS))
)
# DenseNet-BC depths of the paper's table: (L=100, k=12), (L=250, k=24), (L=190, k=40).
DENSENET_DEPTHS = (100, 190, 250)
DENSENET_NAMES = tuple(f"densenet{depth}" for depth in DENSENET_DEPTHS)

_NAME = re.compile(r"(resnet|plain|densenet)(\d+)")


def _choices() -> str:
    return (
        f"{', '.join(MODEL_NAMES + DENSENET_NAMES)} (or resnet<d>/plain<d> for any depth "
        "d = 6n + 2, densenet<L> for any L = 6n + 4, n >= 1)"
    )


def model_constructor(name: str) -> functools.partial:
    """Returns a partial of `ResNet` or `DenseNet` with the layout that `name` selects.

    Raises:
      ValueError: `name` is unknown or its depth is not of a supported form; the
        message lists the valid choices.
    """
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"Unknown model name {name!r}. Valid names: {_choices()}.")
    kind, depth = match.group(1), int(match.group(2))
    if kind == "densenet":
        if depth >= 10 and (depth - 4) % 6 == 0:
            return functools.partial(DenseNet, layers_per_block=(depth - 4) // 6)
        raise ValueError(
            f"Model {name!r}: depth {depth} is not of the form 6n + 4 with n >= 1 (10, 16, "
            f"..., 100, 190, 250). Valid names: {_choices()}."
        )
    plain = kind == "plain"
    if depth in TORCHVISION_DEPTHS:
        block, stages = TORCHVISION_DEPTHS[depth]
        return functools.partial(ResNet, stage_sizes=stages, block_cls=block, plain=plain)
    if depth >= 8 and (depth - 2) % 6 == 0:
        n = (depth - 2) // 6
        return functools.partial(
            ResNet,
            stage_sizes=(n, n, n),
            block_cls=BasicBlock,
            stage_widths=(16, 32, 64),
            stem="cifar",
            plain=plain,
        )
    raise ValueError(
        f"Model {name!r}: depth {depth} is neither a torchvision depth "
        f"({', '.join(map(str, TORCHVISION_DEPTHS))}) nor of the form 6n + 2 "
        f"(20, 26, 32, 38, 44, 56, 110, ...). Valid names: {_choices()}."
    )


def validate_model_config(model_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad value and the valid choices."""
    constructor = model_constructor(model_config.name)
    if model_config.stem not in STEMS:
        raise ValueError(f"model.stem={model_config.stem!r} is not one of {STEMS}.")
    if model_config.shortcut not in SHORTCUTS:
        raise ValueError(
            f"model.shortcut={model_config.shortcut!r} is not one of {SHORTCUTS} "
            "(A: subsample + zero-padded channels, B: 1x1 conv + BN projection)."
        )
    if model_config.num_classes is not None and model_config.num_classes <= 0:
        raise ValueError(
            f"model.num_classes={model_config.num_classes} must be a positive integer "
            "(or unset, to take the dataset's number of classes)."
        )
    if not model_config.width_multiplier > 0:
        raise ValueError(
            f"model.width_multiplier={model_config.width_multiplier} must be positive "
            "(1.0 is the published width)."
        )
    if not 0.0 <= model_config.bn_momentum < 1.0:
        raise ValueError(
            f"model.bn_momentum={model_config.bn_momentum} must be in [0, 1) "
            "(flax convention: 0.9 keeps 90% of the running statistics each step)."
        )
    if not model_config.bn_epsilon > 0:
        raise ValueError(f"model.bn_epsilon={model_config.bn_epsilon} must be positive.")
    growth_rate = model_config.growth_rate
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate <= 0:
        raise ValueError(
            f"model.growth_rate={growth_rate!r} must be a positive integer (the feature maps "
            "each DenseNet layer adds; the paper uses 12, 24 or 40)."
        )
    compression = model_config.compression
    if not 0 < compression <= 1:
        raise ValueError(
            f"model.compression={compression} must be in (0, 1] (the fraction of channels a "
            "DenseNet transition keeps; 0.5 is DenseNet-BC, 1 is no compression)."
        )
    memory_efficient = model_config.memory_efficient
    if not isinstance(memory_efficient, bool):
        raise ValueError(
            f"model.memory_efficient={memory_efficient!r} must be True or False (True: a "
            "DenseNet recomputes each layer's concatenation and bottleneck in the backward pass)."
        )
    if not isinstance(model_config.zero_init_residual, bool):
        raise ValueError(
            f"model.zero_init_residual={model_config.zero_init_residual!r} must be True or False."
        )
    if constructor.func is DenseNet and model_config.zero_init_residual:
        raise ValueError(
            f"model.zero_init_residual=True: {model_config.name} has no residual branch to "
            "start as the identity. Set --config.model.zero_init_residual=False."
        )


def create_model(
    model_config: ml_collections.ConfigDict, num_classes: int, half_precision: bool = False
) -> ResNet | DenseNet:
    """Builds the network that `model_config` describes.

    Args:
      model_config: the `model` section of a config (see resnet_jax/defaults.py).
      num_classes: outputs of the final layer (used when model_config.num_classes is unset).
      half_precision: compute in bfloat16 (parameters and BN statistics stay float32).
    """
    # Checked where the config entered (config_checks.validate, or by the command that
    # read it from a checkpoint); a bad name still fails here with the list of choices.
    constructor = model_constructor(model_config.name)
    dtype = jnp.bfloat16 if half_precision else jnp.float32
    if constructor.func is DenseNet:
        return constructor(
            num_classes=model_config.num_classes or num_classes,
            growth_rate=model_config.growth_rate,
            compression=model_config.compression,
            width_multiplier=model_config.width_multiplier,
            bn_momentum=model_config.bn_momentum,
            bn_epsilon=model_config.bn_epsilon,
            dtype=dtype,
            memory_efficient=model_config.memory_efficient,
        )
    kwargs: dict[str, Any] = {}
    if constructor.keywords.get("stem") is None:
        kwargs["stem"] = model_config.stem
    else:
        kwargs["shortcut"] = model_config.shortcut
    return constructor(
        num_classes=model_config.num_classes or num_classes,
        width_multiplier=model_config.width_multiplier,
        zero_init_residual=model_config.zero_init_residual,
        bn_momentum=model_config.bn_momentum,
        bn_epsilon=model_config.bn_epsilon,
        dtype=dtype,
        **kwargs,
    )
