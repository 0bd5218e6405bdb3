"""A drop-in `lax.conv_general_dilated` whose 3x3 weight gradient is faster on XLA:CPU.

On CPUs, XLA computes the weight gradient of a convolution (a reduction over every
image and pixel into a small 3x3xCxC kernel) at a fraction of the speed of the forward
pass: about 25 GFLOP/s against 80 for ResNet-18's first stage (32x32, 64 channels, batch
128, 2-core Xeon; docs/benchmarks.md). Written as nine matmuls, one per kernel tap,
each split into a few independent chunks of the batch that the CPU threads reduce in
parallel before one final sum, it runs 1.2-1.5x faster for the 32x32 and 16x16 stages,
and the ResNet-18 train step on one CPU device gains about a fifth.

Only 3x3, stride-1, padding-1, NHWC/HWIO convolutions on 16x16 or larger inputs whose
batch splits into `CHUNKS` take this path (measured: the smaller stages are not faster);
everything else, and the forward pass and input gradient always, are XLA's own. The
values are those of `lax.conv_general_dilated` up to float rounding (tests compare
both and their gradients). Chosen by `model.conv_impl=cpu`; off by default: it needs
more memory (the nine shifted copies of each input), and with the batch split over
several simulated CPU devices it measured slower than XLA's own (docs/benchmarks.md).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CHUNKS = 4  # Batch chunks reduced in parallel; the fastest of 1, 2, 4, 8, 16 measured.
MIN_SIZE = 16  # Smallest input height/width that takes the tap-wise weight gradient.
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def conv3x3(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """3x3 convolution, stride 1, zero padding 1, NHWC input, HWIO kernel."""
    return _conv(x, w)


def _forward(x: jnp.ndarray, w: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
    return _conv(x, w), (x, w)


def _backward(residuals: tuple, grad: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x, w = residuals
    grad_x = jax.vjp(lambda x: _conv(x, w), x)[1](grad)[0]
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    grad = grad.reshape(CHUNKS, -1, grad.shape[-1])
    taps = []
    for row in range(3):
        for col in range(3):
            shifted = padded[:, row : row + height, col : col + width, :]
            # One matmul per chunk of the batch (threads take them in parallel), then a sum.
            per_chunk = jnp.einsum(
                "bkc,bkd->bcd",
                shifted.reshape(CHUNKS, -1, channels),
                grad,
                preferred_element_type=jnp.float32,
            )
            taps.append(per_chunk.sum(0))
    grad_w = jnp.stack(taps).reshape(w.shape).astype(w.dtype)
    return grad_x, grad_w


conv3x3.defvjp(_forward, _backward)


def _unit(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def takes_fast_path(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: Any,
    dimension_numbers: Any,
) -> bool:
    """Whether a convolution of these settings uses `conv3x3` (see the module docstring)."""
    if len(lhs_shape) != 4 or tuple(rhs_shape[:2]) != (3, 3):
        return False
    if isinstance(padding, str) or tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
        return False
    expected = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
    return (
        tuple(window_strides) == (1, 1)
        and lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == expected
        and min(lhs_shape[1], lhs_shape[2]) >= MIN_SIZE
        and lhs_shape[0] % CHUNKS == 0
    )


def conv_general_dilated(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jnp.ndarray:
    """`lax.conv_general_dilated`, with `conv3x3` where it is faster on CPU."""
    if (
        _unit(lhs_dilation)
        and _unit(rhs_dilation)
        and feature_group_count == 1
        and precision is None
        and not kwargs
        and takes_fast_path(lhs.shape, rhs.shape, window_strides, padding, dimension_numbers)
    ):
        return conv3x3(lhs, rhs)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs,
    )  # fmt: skip
