"""`--mode=summary`: parameter counts and forward FLOPs of the configured model.

Nothing is trained or initialised for real: shapes come from `jax.eval_shape`, FLOPs
from the traced computation, so even resnet1202 or an ImageNet-size model summarises
in seconds on a CPU.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import linen as nn
from jax.extend import core as jax_core

from resnet_jax import data, steps
from resnet_jax.models import create_model


def _conv_and_dense_flops(jaxpr: jax_core.Jaxpr) -> int:
    """2 x multiply-adds of every convolution and matmul, padding included.

    This is the convention of the papers and of fvcore/ptflops (ResNet-18 on CIFAR:
    1.11 GFLOP). XLA's own cost analysis skips the zero padding of the convolutions
    and so reports less; the summary gives both.
    """
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            # rhs_spec = (out feature dim, in feature dim, *spatial dims).
            kernel_in = rhs.shape[dn.rhs_spec[1]]
            kernel_window = int(np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]]))
            total += 2 * int(np.prod(out.shape)) * kernel_in * kernel_window
        elif eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            contracted = int(np.prod([lhs.shape[d] for d in lhs_contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
    # Calls (jit, custom derivatives) hold their own jaxprs.
    return total + sum(_conv_and_dense_flops(sub) for sub in jax_core.subjaxprs(jaxpr))


def _forward(model: nn.Module, image_size: int) -> tuple[Any, dict[str, Any], Any]:
    """The eval-mode forward of one image, its variables' shapes and the image's shape."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = steps.variables_template(model, image_size)

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    return forward, variables, image


def forward_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of `model`'s forward pass per `image_size` square image, as `--mode=summary` counts.

    Counted from the traced computation (no device, nothing compiled), so the count is
    the same on every backend; a train step costs about 3 times this (the backward
    computes two gradients per convolution, each about the forward's cost).
    """
    forward, variables, image = _forward(model, image_size)
    return _conv_and_dense_flops(jax.make_jaxpr(forward)(variables, image).jaxpr)


def model_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Returns parameter counts, forward FLOPs per example and the parameter table."""
    num_classes = config.model.num_classes or data.num_classes(config)
    model = create_model(config.model, num_classes, config.half_precision)
    forward, variables, image = _forward(model, config.image_size)
    xla_cost = jax.jit(forward).lower(variables, image).cost_analysis()
    return {
        "model": config.model.name,
        "num_classes": num_classes,
        "image_size": config.image_size,
        "total_params": int(parameter_overview.count_parameters(variables["params"])),
        "batch_stats": int(parameter_overview.count_parameters(variables.get("batch_stats", {}))),
        "flops_per_example": forward_flops(model, config.image_size),
        "xla_flops_per_example": int(xla_cost["flops"]) if xla_cost else None,
        "table": parameter_overview.get_parameter_overview(
            variables["params"], include_stats=False
        ),
    }


def print_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Prints clu's table of every parameter, then the summary as JSON on the last line."""
    summary = model_summary(config)
    print(summary.pop("table"))
    print(f"total {summary['total_params']:,}")
    print(
        f"forward: {summary['flops_per_example'] / 1e9:.3f} GFLOP per "
        f"{config.image_size}x{config.image_size} image (2 x multiply-adds; XLA's count, "
        f"which skips padding: {(summary['xla_flops_per_example'] or 0) / 1e9:.3f})"
    )
    print(json.dumps(summary))
    return summary
