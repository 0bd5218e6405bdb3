"""models/cpu_conv.py computes what lax.conv_general_dilated computes, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import smoke
from resnet_jax.models import cpu_conv, create_model

NHWC = ("NHWC", "HWIO", "NHWC")


def reference(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def fast(x, w):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # As flax passes them.
    return cpu_conv.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn)


@pytest.mark.parametrize("shape", [(8, 16, 16, 16), (4, 32, 24, 8), (12, 16, 16, 3)])
def test_values_and_gradients_match_lax(shape):
    key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, shape)
    w = jax.random.normal(key_w, (3, 3, shape[-1], 5)) * 0.1
    assert cpu_conv.takes_fast_path(x.shape, w.shape, (1, 1), [(1, 1), (1, 1)],
                                    lax.conv_dimension_numbers(x.shape, w.shape, NHWC))  # fmt: skip
    out, vjp = jax.vjp(fast, x, w)
    expected, expected_vjp = jax.vjp(reference, x, w)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    grad = jax.random.normal(key_g, out.shape)
    for got, want in zip(vjp(grad), expected_vjp(grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_other_convolutions_are_lax_own():
    dn = lax.conv_dimension_numbers((8, 16, 16, 4), (3, 3, 4, 4), NHWC)
    assert not cpu_conv.takes_fast_path((8, 16, 16, 4), (3, 3, 4, 4), (2, 2), [(1, 1)] * 2, dn)
    assert not cpu_conv.takes_fast_path((8, 8, 8, 4), (3, 3, 4, 4), (1, 1), [(1, 1)] * 2, dn)
    assert not cpu_conv.takes_fast_path((6, 16, 16, 4), (3, 3, 4, 4), (1, 1), [(1, 1)] * 2, dn)
    assert not cpu_conv.takes_fast_path((8, 16, 16, 4), (1, 1, 4, 4), (1, 1), [(0, 0)] * 2, dn)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    got = cpu_conv.conv_general_dilated(x, w, (2, 2), [(1, 1)] * 2, dimension_numbers=dn)
    want = lax.conv_general_dilated(x, w, (2, 2), [(1, 1)] * 2, dimension_numbers=dn)
    np.testing.assert_array_equal(got, want)


def test_a_model_trains_the_same_with_either_implementation():
    """Loss and every parameter gradient of a ResNet-8 agree between "cpu" and "xla"."""
    config = smoke.get_config()
    images = jax.random.normal(jax.random.key(3), (8, 16, 16, 3))
    labels = jnp.arange(8) % 3
    results = {}
    for impl in ("xla", "cpu"):
        config.model.conv_impl = impl
        model = create_model(config.model, 3)
        variables = model.init(jax.random.key(0), images, train=False)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])  # fmt: skip
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])

        results[impl] = jax.value_and_grad(loss)(variables["params"])
    (loss_xla, grads_xla), (loss_cpu, grads_cpu) = results["xla"], results["cpu"]
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The smoke model has 16x16 inputs: its first stage takes the fast path.
    jaxpr = str(jax.make_jaxpr(lambda x: create_model(config.model, 3).init(
        jax.random.key(0), x, train=False))(images))  # fmt: skip
    assert "custom_vjp_call" in jaxpr
