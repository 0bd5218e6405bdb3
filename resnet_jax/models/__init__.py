"""The model registry: a name in the config selects a network.

Names:
- resnet18, resnet34, resnet50, resnet101, resnet152: the torchvision family, with the
  stem chosen by `model.stem` ("cifar" or "imagenet").
- resnet<depth> with depth = 6n + 2 (resnet20/32/44/56/110/1202 in the paper, any n >= 1
  accepted): the paper's CIFAR nets, 16/32/64 filters, shortcut `model.shortcut` (A or B).
  Depths 50 and 152 are 6n + 2 too; those names mean the bottleneck nets above.
- plain<depth>: the same net as resnet<depth> with every shortcut removed.
"""

import functools
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

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
CONV_IMPLS = ("xla", "cpu")
MODEL_NAMES = tuple(
    f"{kind}{depth}"
    for kind in ("resnet", "plain")
    for depth in sorted((*TORCHVISION_DEPTHS, *PAPER_CIFAR_DEPTHS))
)

_NAME = re.compile(r"(resnet|plain)(\d+)")


def _choices() -> str:
    return f"{', '.join(MODEL_NAMES)} (or resnet<d>/plain<d> for any depth d = 6n + 2, n >= 1)"


def model_constructor(name: str) -> functools.partial:
    """Returns a partial of `ResNet` with the layout that `name` selects.

    Raises:
      ValueError: `name` is unknown or its depth is not of a supported form; the
        message lists the valid choices.
    """
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"Unknown model name {name!r}. Valid names: {_choices()}.")
    kind, depth = match.group(1), int(match.group(2))
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
    model_constructor(model_config.name)
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
    if model_config.get("conv_impl", "xla") not in CONV_IMPLS:
        raise ValueError(
            f"model.conv_impl={model_config.conv_impl!r} is not one of {CONV_IMPLS} (cpu: "
            "a weight gradient for XLA:CPU, see resnet_jax/models/cpu_conv.py)."
        )
    if not model_config.bn_epsilon > 0:
        raise ValueError(f"model.bn_epsilon={model_config.bn_epsilon} must be positive.")


def create_model(
    model_config: ml_collections.ConfigDict, num_classes: int, half_precision: bool = False
) -> ResNet:
    """Builds the network that `model_config` describes.

    Args:
      model_config: the `model` section of a config (see configs/default.py).
      num_classes: outputs of the final layer (used when model_config.num_classes is unset).
      half_precision: compute in bfloat16 (parameters and BN statistics stay float32).
    """
    validate_model_config(model_config)
    constructor = model_constructor(model_config.name)
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
        dtype=jnp.bfloat16 if half_precision else jnp.float32,
        conv_impl=model_config.get("conv_impl", "xla"),
        **kwargs,
    )
