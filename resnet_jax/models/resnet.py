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
import jax
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(
    train: bool, momentum: float, epsilon: float, dtype: Any, **kwargs: Any
) -> nn.BatchNorm:
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


def conv(features: int, size: int, strides: int, dtype: Any, name: str) -> nn.Conv:
    """A size x size convolution without bias (a BatchNorm follows), float32 parameters."""
    # Explicit symmetric padding, as PyTorch pads: "SAME" would pad a stride-2 conv
    # on the bottom/right only, and imported weights would see shifted inputs.
    padding = ((size // 2, size // 2),) * 2
    return nn.Conv(
        features,
        (size, size),
        strides,
        padding=padding,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class _Block(nn.Module):
    """What the two residual blocks share: settings, layer makers and the shortcut."""

    filters: int
    strides: int = 1
    shortcut: str = "B"  # "A": subsample + zero-pad channels; "B": 1x1 conv + BN projection.
    plain: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    expansion = 1

    def conv(self, features: int, size: int, strides: int, name: str) -> nn.Conv:
        return conv(features, size, strides, self.dtype, name)

    def norm(self, train: bool, name: str, last: bool = False) -> nn.BatchNorm:
        # Zero-init only where a shortcut carries the signal past the branch.
        zero = last and self.zero_init_residual and not self.plain
        return _batch_norm(
            train,
            self.bn_momentum,
            self.bn_epsilon,
            self.dtype,
            name=name,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
        )

    def merge(self, branch: jnp.ndarray, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """relu(branch + shortcut(x)), or relu(branch) in a plain net."""
        if self.plain:
            return nn.relu(branch)
        out_channels, in_channels = branch.shape[-1], x.shape[-1]
        if self.strides == 1 and in_channels == out_channels:
            return nn.relu(branch + x)
        if self.shortcut == "A":
            # Option A: no parameters. Subsample spatially, pad the new channels with
            # zeros on both sides (as the PyTorch CIFAR ResNets do, so weights carry over).
            # A strided slice, not x[:, ::s, ::s]: with a symbolic batch size (export)
            # indexing becomes a gather, which TFLite cannot convert.
            x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.strides, self.strides, 1))
            extra = out_channels - in_channels
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        else:
            x = self.conv(out_channels, 1, self.strides, "downsample_conv")(x)
            x = self.norm(train, "downsample_bn")(x)
        return nn.relu(branch + x)


class BasicBlock(_Block):
    """Two 3x3 convolutions; the residual branch of resnet18/34 and the CIFAR nets."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = self.conv(self.filters, 3, self.strides, "conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        y = self.conv(self.filters, 3, 1, "conv2")(y)
        y = self.norm(train, "bn2", last=True)(y)
        return self.merge(y, x, train)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4; the residual branch of resnet50/101/152."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = self.conv(self.filters, 1, 1, "conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        y = self.conv(self.filters, 3, self.strides, "conv2")(y)
        y = nn.relu(self.norm(train, "bn2")(y))
        y = self.conv(self.filters * self.expansion, 1, 1, "conv3")(y)
        y = self.norm(train, "bn3", last=True)(y)
        return self.merge(y, x, train)


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
            # Padding after the ReLU (x >= 0) with zeros equals max_pool's -inf padding;
            # written out because the ONNX converter drops max_pool's explicit padding.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
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
