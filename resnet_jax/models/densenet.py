"""DenseNet-BC for CIFAR (Huang et al. 2017, "Densely Connected Convolutional Networks").

Every layer of a dense block sees the concatenation of all feature maps before it in the
block and adds `growth_rate` (k) new ones. The -BC variant has a Bottleneck in each layer
(BN-ReLU-Conv1x1 to 4k channels, then BN-ReLU-Conv3x3 to k) and Compresses the channels
in each transition (BN-ReLU-Conv1x1 to floor(compression x channels), 2x2 average pool).
The CIFAR layout: a 3x3 conv to 2k channels, three dense blocks of n = (L - 4) / 6 layers
at 32, 16 and 8 pixels, BN-ReLU, global average pool, a dense layer.

Layer names: `conv1`, `block1_layer0/{bn1,conv1,bn2,conv2}`, `transition1/{bn,conv}`,
`bn_final`, `fc`.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.resnet import _batch_norm, conv


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k) then BN-ReLU-Conv3x3 (k): the k new feature maps of one layer.

    Takes the block's feature maps so far as a list and concatenates them itself, so that
    with `memory_efficient` the concatenation is inside the recomputed part.

    Attributes:
      memory_efficient: recompute the concatenation, bn1 and its ReLU in the backward pass
        instead of keeping them (Pleiss et al. 2017): what a layer keeps no longer grows
        with its input width, for one more concatenation and BN per layer. The variables,
        their names, the outputs and the gradients are the same either way. XLA:CPU keeps
        the recomputation only with `xla_disable_hlo_passes=cse_barrier_expander` (its
        pipeline drops jax.checkpoint's barriers before CSE, which merges it back into the
        forward pass; scripts/compare_models.py --cpu_remat measures both).
    """

    growth_rate: int
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray], train: bool) -> jnp.ndarray:
        norm = dict(
            train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype
        )

        def bottleneck(module: nn.Module, features: Sequence[jnp.ndarray]) -> jnp.ndarray:
            # nn.remat of a function of this module, not of a submodule class: bn1 and conv1
            # stay directly under the layer, so checkpoints fit either setting.
            del module
            y = nn.relu(_batch_norm(name="bn1", **norm)(jnp.concatenate(features, axis=-1)))
            return conv(4 * self.growth_rate, 1, 1, self.dtype, "conv1")(y)

        if self.memory_efficient:
            bottleneck = nn.remat(bottleneck)
        y = bottleneck(self, list(features))
        y = nn.relu(_batch_norm(name="bn2", **norm)(y))
        return conv(self.growth_rate, 3, 1, self.dtype, "conv2")(y)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 to `features` channels, then a 2x2 average pool with stride 2."""

    features: int
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name="bn")(x)
        x = conv(self.features, 1, 1, self.dtype, "conv")(nn.relu(x))
        return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC with the CIFAR layout: three dense blocks of `layers_per_block` layers.

    Attributes:
      layers_per_block: n; the depth is L = 6n + 4 (two convolutions per layer, the first
        conv, two transitions and the dense layer).
      num_classes: outputs of the final dense layer.
      growth_rate: k, the feature maps each layer adds, before `width_multiplier`.
      compression: theta; a transition keeps floor(theta x channels) channels.
      width_multiplier: scales k (rounded, at least 1); every width of the net is a
        multiple of k or, after a transition, a fraction of one, so this scales them all.
      bn_momentum, bn_epsilon: BatchNorm settings (flax momentum convention).
      dtype: compute dtype; parameters and BN statistics are always float32.
      memory_efficient: recompute each dense layer's concatenation and bottleneck in the
        backward pass (see DenseLayer); the same variables, outputs and gradients.
    """

    layers_per_block: int
    num_classes: int
    growth_rate: int = 12
    compression: float = 0.5
    width_multiplier: float = 1.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images [batch, height, width, 3] to float32 logits [batch, num_classes]."""
        k = max(1, round(self.growth_rate * self.width_multiplier))
        norm = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv(2 * k, 3, 1, self.dtype, "conv1")(x)
        for block in range(3):
            features = [x]
            for index in range(self.layers_per_block):
                # Each layer's concatenation is a new buffer: without memory_efficient,
                # autodiff keeps every one for the backward pass and activation memory
                # grows as n^2 per block (see scripts/compare_models.py).
                features.append(
                    DenseLayer(
                        growth_rate=k,
                        bn_momentum=self.bn_momentum,
                        bn_epsilon=self.bn_epsilon,
                        dtype=self.dtype,
                        memory_efficient=self.memory_efficient,
                        name=f"block{block + 1}_layer{index}",
                    )(features, train)
                )
            x = jnp.concatenate(features, axis=-1)
            if block < 2:
                # The epsilon keeps floor() from losing a channel to rounding
                # (0.29 * 100 = 28.999999999999996).
                features = max(1, math.floor(self.compression * x.shape[-1] + 1e-9))
                x = Transition(
                    features,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    name=f"transition{block + 1}",
                )(x, train)
        x = nn.relu(_batch_norm(train, name="bn_final", **norm)(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        # The loss and softmax want float32 whatever the compute dtype.
        return jnp.asarray(x, jnp.float32)
