"""ResNet and its plain twin (He et al. 2015), as flat Flax linen modules.

One `ResNet` module covers three layouts:
- the torchvision family (resnet18/34/50/101/152, v1.5: a bottleneck strides on its
  3x3 conv) with the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or the CIFAR stem
  (3x3/1 conv, no max-pool);
- the paper's CIFAR nets of depth 6n+2 (16/32/64 filters, shortcut option A or B);
- with `plain=True`, the same layers without any shortcut (the degradation experiment).

Layer names follow torchvision (`conv1`, `bn1`, `layer2_0/conv1`, `layer2_0/downsample_conv`,
`fc`) so that importing PyTorch weights is a renaming, not a search.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, momentum: float, epsilon: float, dtype: Any, **kwargs) -> nn.BatchNorm:
    # Statistics are reduced in float32 and stored in float32 (flax does both by default
    # for bfloat16 inputs); only the normalised output is in `dtype`.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        **kwargs,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the residual branch of resnet18/34 and the CIFAR nets."""

    filters: int
    strides: int = 1
    shortcut: str = "B"  # "A": subsample + zero-pad channels; "B": 1x1 conv + BN projection.
    plain: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = dict(
            train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype
        )
        conv = dict(
            use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32
        )
        y = nn.Conv(
            self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1", **conv
        )(x)
        y = nn.relu(_batch_norm(name="bn1", **norm)(y))
        y = nn.Conv(self.filters, (3, 3), 1, padding=((1, 1), (1, 1)), name="conv2", **conv)(y)
        last_scale = (
            nn.initializers.zeros
            if self.zero_init_residual and not self.plain
            else nn.initializers.ones
        )
        y = _batch_norm(name="bn2", scale_init=last_scale, **norm)(y)
        if not self.plain:
            y = y + _shortcut(self, x, self.filters * self.expansion, norm, conv)
        return nn.relu(y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4; the residual branch of resnet50/101/152."""

    filters: int
    strides: int = 1
    shortcut: str = "B"
    plain: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = dict(
            train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype
        )
        conv = dict(
            use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32
        )
        y = nn.Conv(self.filters, (1, 1), name="conv1", **conv)(x)
        y = nn.relu(_batch_norm(name="bn1", **norm)(y))
        y = nn.Conv(
            self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2", **conv
        )(y)
        y = nn.relu(_batch_norm(name="bn2", **norm)(y))
        y = nn.Conv(self.filters * self.expansion, (1, 1), name="conv3", **conv)(y)
        last_scale = (
            nn.initializers.zeros
            if self.zero_init_residual and not self.plain
            else nn.initializers.ones
        )
        y = _batch_norm(name="bn3", scale_init=last_scale, **norm)(y)
        if not self.plain:
            y = y + _shortcut(self, x, self.filters * self.expansion, norm, conv)
        return nn.relu(y)


def _shortcut(
    block: nn.Module, x: jnp.ndarray, out_channels: int, norm: dict, conv: dict
) -> jnp.ndarray:
    """The identity, or what makes `x` match the branch's shape (called inside `block`)."""
    in_channels = x.shape[-1]
    if block.strides == 1 and in_channels == out_channels:
        return x
    if block.shortcut == "A":
        # Option A: no parameters. Subsample spatially, pad the new channels with zeros
        # on both sides (as the PyTorch CIFAR ResNets do, so their weights carry over).
        x = x[:, :: block.strides, :: block.strides, :]
        extra = out_channels - in_channels
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    x = nn.Conv(out_channels, (1, 1), block.strides, name="downsample_conv", **conv)(x)
    return _batch_norm(name="downsample_bn", **norm)(x)


class ResNet(nn.Module):
    """A ResNet (or, with `plain=True`, the same net without shortcuts).

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for resnet18.
      block_cls: BasicBlock or Bottleneck.
      num_classes: outputs of the final dense layer.
      stage_widths: filters of each stage before `width_multiplier` (and before a
        bottleneck's x4 expansion).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv).
      shortcut: "A" or "B", used where a block changes the shape.
      plain: drop every shortcut.
      width_multiplier: scales every width (rounded, at least 1 filter).
      zero_init_residual: zero the scale of each residual branch's last BN.
      bn_momentum, bn_epsilon: BatchNorm settings (flax momentum convention).
      dtype: compute dtype; parameters and BN statistics are always float32.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    shortcut: str = "B"
    plain: bool = False
    width_multiplier: float = 1.0
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images [batch, height, width, 3] to float32 logits [batch, num_classes]."""
        widths = [max(1, round(w * self.width_multiplier)) for w in self.stage_widths]
        conv = dict(
            use_bias=False, kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32
        )
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(widths[0], (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1", **conv)(x)
        else:
            x = nn.Conv(widths[0], (3, 3), 1, padding=((1, 1), (1, 1)), name="conv1", **conv)(x)
        x = _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn1")(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (num_blocks, filters) in enumerate(zip(self.stage_sizes, widths, strict=True)):
            for index in range(num_blocks):
                x = self.block_cls(
                    filters=filters,
                    strides=2 if stage > 0 and index == 0 else 1,
                    shortcut=self.shortcut,
                    plain=self.plain,
                    zero_init_residual=self.zero_init_residual,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        # The loss and softmax want float32 whatever the compute dtype.
        return jnp.asarray(x, jnp.float32)
