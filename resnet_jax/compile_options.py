"""XLA compile options the project's jitted steps pass on CPU: which kernels run the convolutions.

`config.cpu_convolutions` chooses:

- "eigen" (default): convolutions on XLA's own Eigen kernels, reductions (BatchNorm's
  statistics) on YNNPACK. XLA:CPU's default sends the convolutions to YNNPACK too, which
  runs ResNet's weight gradients several times slower (docs/benchmarks.md,
  `scripts/conv_benchmark.py`). Same values up to float rounding.
- "xla_default": no option passed, whatever the installed XLA does.

Passed per compiled function (`jax.jit(..., compiler_options=...)`) and only when the
default backend is the CPU; a jaxlib that does not know the option gets the default,
with one warning.

`run_once_options()` is for programs that run once per command (the parameter
initialisation): XLA:CPU compiles them without its backend optimisations. Initialising
ResNet-20 compiles in 1.7 s instead of 16 s that way (threefry's random bits are most of
the program), and an initialisation runs for milliseconds either way. The values agree
with the optimised program's to about one float32 rounding step (6e-8 at most in the
parameters of ResNet-8 to -56), not bitwise.
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


# For programs that run once: no LLVM optimisation of the generated code.
_RUN_ONCE = {"xla_backend_optimization_level": 0}


@functools.cache
def _accepted(options: tuple[tuple[str, Any], ...], warning: str) -> bool:
    """Whether this jaxlib's CPU compiler takes `options` (compiles a tiny function with them).

    If not, logs `warning` once, its {error} filled with the compiler's first line.
    """
    try:
        jax.jit(jnp.sum, compiler_options=dict(options)).lower(jnp.zeros(2)).compile()
    except jax.errors.JaxRuntimeError as e:
        logging.warning(warning.format(error=str(e).splitlines()[0]))
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
    warning = (
        "cpu_convolutions=eigen has no effect with this jaxlib ({error}): XLA's default "
        "convolution kernels are used."
    )
    return dict(options) if _accepted(options, warning) else None


def run_once_options() -> dict[str, Any] | None:
    """`compiler_options` for a program that runs once (initialisation), or None off the CPU."""
    if jax.default_backend() != "cpu":
        return None
    options = tuple(sorted(_RUN_ONCE.items()))
    warning = (
        "Compiling the initialisation unoptimised has no effect with this jaxlib ({error}): "
        "it compiles with XLA's optimisations (slower, the same parameters up to rounding)."
    )
    return dict(options) if _accepted(options, warning) else None
