"""XLA compile options the project's jitted steps pass on CPU: which kernels run the convolutions.

XLA:CPU (jax 0.10) hands each convolution to YNNPACK by default. For ResNet's layers
that is the slower choice: its weight gradients run at a quarter of the speed of XLA's
own (Eigen) convolution kernels, and its forward passes and input gradients at about
half (docs/benchmarks.md, `scripts/conv_benchmark.py`). `config.cpu_convolutions`
chooses:

- "eigen" (default): convolutions stay on XLA's Eigen kernels; reductions (BatchNorm's
  statistics) still go to YNNPACK, where they are faster. Same operations, same values
  up to float rounding (tests/test_compile_options.py compares the losses and gradients
  of a train step compiled both ways).
- "xla_default": no option passed, whatever the installed XLA does.

The option is passed per compiled function (`jax.jit(..., compiler_options=...)`), only
when the default backend is the CPU: GPU and TPU compilations never see it. A jaxlib
that does not know the option (older or newer than the one measured) gets the default,
with one warning.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

CPU_CONVOLUTIONS = ("eigen", "xla_default")

# The library fusions XLA:CPU makes without the convolutions: YNNPACK keeps single dots
# and reductions, as by default (measured fastest for BatchNorm's statistics).
_EIGEN_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )
}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler takes `options` (compiles a tiny function with them)."""
    try:
        jax.jit(jnp.sum, compiler_options=dict(options)).lower(jnp.zeros(2)).compile()
    except jax.errors.JaxRuntimeError as e:
        logging.warning(
            "cpu_convolutions=eigen has no effect with this jaxlib (%s): XLA's default "
            "convolution kernels are used.",
            str(e).splitlines()[0],
        )
        return False
    return True


def cpu_options(setting: str = "eigen") -> dict[str, Any] | None:
    """`compiler_options` for `jax.jit` under `config.cpu_convolutions=setting`, or None.

    None (XLA's defaults) unless the default backend is the CPU and the setting is "eigen".
    """
    if setting not in CPU_CONVOLUTIONS:
        raise ValueError(
            f"cpu_convolutions={setting!r} is not one of {CPU_CONVOLUTIONS} (eigen: XLA's own "
            "convolution kernels on CPU, faster for ResNets; xla_default: XLA's choice)."
        )
    if setting != "eigen" or jax.default_backend() != "cpu":
        return None
    options = tuple(sorted(_EIGEN_CONVOLUTIONS.items()))
    return dict(options) if _accepted(options) else None
