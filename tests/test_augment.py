"""The train step's augmentations: each operation, each distribution and geometry, the mixing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from resnet_jax.data import augment


@pytest.fixture(scope="module")
def picture():
    """A 32x28 RGB image with a flat band (so the histogram operations have work to do)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 28, 3), dtype=np.uint8)
    image[:8] = rng.integers(40, 120, (8, 28, 3))
    return image


def _ours(name, image, magnitude):
    names = [row[0] for row in augment.operations(image.shape[0])]
    op = jnp.int32(names.index(name))
    return np.asarray(augment.apply_operation(jnp.asarray(image, jnp.float32), op, magnitude))


def _pil_affine(image, coefficients):
    pil = Image.fromarray(image)
    return np.asarray(pil.transform(pil.size, Image.AFFINE, coefficients), np.float32)


@pytest.mark.parametrize(
    "name, magnitude, reference",
    [
        ("identity", 0.0, lambda im: im),
        ("equalize", 0.0, lambda im: ImageOps.equalize(im)),
        ("autocontrast", 0.0, lambda im: ImageOps.autocontrast(im)),
        ("posterize", 3.0, lambda im: ImageOps.posterize(im, 3)),
        ("solarize", 128.0, lambda im: ImageOps.solarize(im, 128)),
        ("rotate", 30.0, lambda im: im.rotate(30)),
        ("rotate", -7.3, lambda im: im.rotate(-7.3)),
    ],
)
def test_operations_equal_pil(picture, name, magnitude, reference):
    expected = np.asarray(reference(Image.fromarray(picture)), np.float32)
    np.testing.assert_array_equal(_ours(name, picture, magnitude), expected)


@pytest.mark.parametrize("m", [0.3, -0.17, 0.99])
def test_shears_and_translations_equal_pil(picture, m):
    np.testing.assert_array_equal(
        _ours("shear_x", picture, m), _pil_affine(picture, (1, m, 0, 0, 1, 0))
    )
    np.testing.assert_array_equal(
        _ours("shear_y", picture, m), _pil_affine(picture, (1, 0, 0, m, 1, 0))
    )
    pixels = round(10 * m)
    np.testing.assert_array_equal(
        _ours("translate_x", picture, float(pixels)), _pil_affine(picture, (1, 0, -pixels, 0, 1, 0))
    )
    np.testing.assert_array_equal(
        _ours("translate_y", picture, float(pixels)), _pil_affine(picture, (1, 0, 0, 0, 1, -pixels))
    )


@pytest.mark.parametrize("name", ["brightness", "color", "contrast", "sharpness"])
@pytest.mark.parametrize("factor", [0.3, 1.7])
def test_enhancements_are_pils_within_one_level(picture, name, factor):
    """PIL truncates where we round: at most one grey level apart."""
    expected = getattr(ImageEnhance, name.capitalize())(Image.fromarray(picture)).enhance(factor)
    difference = np.abs(_ours(name, picture, factor - 1.0) - np.asarray(expected, np.float32))
    assert difference.max() <= 1.0


def test_policies_draw_the_operations_and_magnitudes_they_should():
    n = 20000
    table = augment.operations(32)
    for policy, column in (("randaugment", 2), ("trivialaugment", 3)):
        settings = augment.Settings(policy=policy, randaugment_num_ops=2, randaugment_magnitude=9)
        ops, values = (
            np.asarray(x) for x in augment.draw_policy(jax.random.key(1), n, settings, 32)
        )
        assert ops.shape == values.shape == ((n, 2) if policy == "randaugment" else (n, 1))
        counts = np.bincount(ops.reshape(-1), minlength=len(table))
        assert stats.chisquare(counts).pvalue > 1e-4  # Uniform over the 14 operations.
        magnitudes = np.stack([row[column] for row in table])
        signed = np.asarray([row[4] for row in table])
        for op in range(len(table)):
            drawn = values[ops == op]
            if policy == "randaugment":  # Always bin 9, either sign for signed operations.
                assert set(np.abs(drawn).tolist()) <= {abs(float(magnitudes[op, 9]))}
            else:
                assert set(np.abs(drawn).round(4).tolist()) <= set(
                    np.abs(magnitudes[op]).round(4).tolist()
                )
            if signed[op] and magnitudes[op].max() > 0:
                assert 0.45 < np.mean(drawn < 0) < 0.55 or np.all(drawn == 0)
    trivial = augment.Settings(policy="trivialaugment")
    ops, values = (np.asarray(x) for x in augment.draw_policy(jax.random.key(2), n, trivial, 32))
    rotations = np.abs(values[ops == 5])
    bins = np.round(rotations / (135 / 30)).astype(int)
    assert stats.chisquare(np.bincount(bins, minlength=31)).pvalue > 1e-4


def test_posterize_bins_span_the_torchvision_bits():
    assert augment._posterize_bins(4)[[0, -1]].tolist() == [8.0, 4.0]
    assert augment._posterize_bins(2)[[0, -1]].tolist() == [8.0, 2.0]


def _mix_draws(settings, n, height=32, width=32):
    keys = jax.random.split(jax.random.key(3), n)
    draws = jax.vmap(lambda k: augment.draw_mix(k, settings, height, width))(keys)
    return {k: np.asarray(v) for k, v in draws.items()}


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mixup_weights_follow_the_beta_law(alpha):
    draws = _mix_draws(augment.Settings(mixup_alpha=alpha), 4000)
    assert (draws["box"] == 0).all()
    assert stats.kstest(draws["weight"], stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_cutmix_weight_is_the_area_kept_and_the_box_lies_inside():
    draws = _mix_draws(augment.Settings(cutmix_alpha=1.0), 4000, height=32, width=24)
    top, left, h, w = draws["box"].T
    assert (
        (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 24).all()
    )
    np.testing.assert_allclose(draws["weight"], 1 - h * w / (32 * 24), rtol=1e-6)
    # Unclipped, the box has area about (1 - lambda) with lambda ~ Beta(1, 1) (mean 1/2);
    # boxes clipped at the border shrink, so more is kept on average.
    assert 0.5 <= draws["weight"].mean() < 0.75


def test_mix_probability_and_switch():
    settings = augment.Settings(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.6)
    draws = _mix_draws(settings, 4000)
    mixed = draws["weight"] < 1
    cutmix = draws["box"][:, 2] * draws["box"][:, 3] > 0
    assert abs(mixed.mean() - 0.6) < 0.03
    assert abs(cutmix.mean() / mixed.mean() - 0.5) < 0.04  # mix_switch_prob of the mixed.


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_pixels_mix_with_the_weight_the_labels_get(kind):
    batch = 6
    images = jnp.broadcast_to(
        jnp.arange(batch, dtype=jnp.float32)[:, None, None, None], (batch, 32, 32, 3)
    )
    settings = augment.Settings(**{f"{kind}_alpha": 1.0})
    for seed in range(5):
        mixed, weight = augment.augment_batch(settings, seed, jnp.int32(7), images, lambda x: x)
        mixed, weight = np.asarray(mixed), float(weight)
        for i in range(batch):
            own, partner = i, batch - 1 - i
            if kind == "mixup":
                np.testing.assert_allclose(
                    mixed[i], weight * own + (1 - weight) * partner, rtol=1e-6
                )
            elif own != partner:
                kept = np.mean(mixed[i] == own)
                assert kept == pytest.approx(weight, abs=1e-6)
                assert np.all((mixed[i] == own) | (mixed[i] == partner))


def test_cutout_squares_are_clipped_at_the_borders():
    boxes = np.asarray(augment.draw_cutout(jax.random.key(4), 5000, 32, 28, 16))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (top + h <= 32).all() and (left + w <= 28).all()
    assert h.max() == 16 and w.max() == 16 and h.min() >= 8 and w.min() >= 8
    # Centres uniform over the pixels: a full 16x16 square for centres 8..24 (rows), 8..20.
    full = (h == 16) & (w == 16)
    assert abs(full.mean() - (17 / 32) * (13 / 28)) < 0.02
    masks = np.asarray(augment.box_mask(jnp.asarray(boxes[:50]), 32, 28))
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), h[:50] * w[:50])


def test_random_erasing_rectangles_have_the_configured_areas_and_aspects():
    n, area = 20000, (0.02, 0.4)
    boxes = np.asarray(augment.draw_erasing(jax.random.key(5), n, 32, 32, 0.5, area, 0.3))
    top, left, h, w = boxes.T
    erased = h * w > 0
    assert abs(erased.mean() - 0.5) < 0.02
    fraction = h[erased] * w[erased] / (32 * 32)
    # Rounding h and w to pixels moves the area by at most about a row and a column.
    assert fraction.min() >= area[0] - 2 * 33 / 1024 and fraction.max() <= area[1] + 2 * 33 / 1024
    aspect = h[erased] / w[erased]
    assert aspect.min() >= 0.3 * 0.8 and aspect.max() <= 1 / 0.3 * 1.25
    assert (top + h <= 32).all() and (left + w <= 32).all() and (top >= 0).all()
    assert 0.15 < fraction.mean() < 0.25  # Uniform area in [0.02, 0.4], few rejected.


def test_erasing_and_cutout_fill_with_zero_after_normalisation():
    images = jnp.full((4, 16, 16, 3), 200, jnp.uint8)
    settings = augment.Settings(cutout_size=8)
    out, weight = augment.augment_batch(settings, 0, jnp.int32(0), images, lambda x: x / 255.0 + 1)
    out = np.asarray(out)
    assert weight is None
    np.testing.assert_allclose(np.unique(out), [0.0, 200 / 255 + 1], rtol=1e-6)
    assert ((out == 0).all(axis=-1).sum(axis=(1, 2)) >= 16).all()


def test_draws_depend_on_seed_and_step_only():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)), jnp.uint8)
    settings = augment.Settings(
        policy="randaugment", cutout_size=4, random_erasing=0.5, mixup_alpha=0.4, cutmix_alpha=1.0
    )
    # The seed traced like the step: one compiled program for every draw below.
    run = jax.jit(
        lambda seed, step: augment.augment_batch(settings, seed, step, images, lambda x: x / 255.0)
    )
    first, again, other_step, other_seed = run(0, 3), run(0, 3), run(0, 4), run(1, 3)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other_step[0])
    assert not np.array_equal(first[0], other_seed[0])
