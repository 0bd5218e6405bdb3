"""The augmentations of modern recipes, run on the devices inside the compiled train step.

Both input paths deliver uint8 batches already cropped and flipped (`data.device`,
`data.stream`); the train step then applies, in this order, each only when its config
switch is on:

1. RandAugment (Cubuk et al. 2020) or TrivialAugment (Mueller and Hutter 2021), per
   image, on pixel values 0-255 (the 14 operations and magnitude ranges of torchvision's
   `RandAugment` and `TrivialAugmentWide`, 31 magnitude bins);
2. normalisation to (x / 255 - mean) / std;
3. Cutout (DeVries and Taylor 2017) and random erasing (Zhong et al. 2020), per image,
   filling with 0: the dataset's mean colour;
4. mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), once per batch: the batch is
   mixed with itself in reverse order, and the loss with the same weight
   (`steps.train_step`).

Every draw comes from a key that depends on (seed, step) alone, and is drawn for the
whole global batch, so a resumed run draws what an uninterrupted one draws, and the
number of devices or processes changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import config_checks
from resnet_jax.data import splits

NUM_BINS = config_checks.MAGNITUDE_BINS


@dataclasses.dataclass(frozen=True)
class Settings:
    """The train step's augmentations (all off by default); see resnet_jax/defaults.py."""

    policy: str = "none"
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    cutout_size: int = 0
    random_erasing: float = 0.0
    random_erasing_area: tuple[float, float] = (0.02, 0.4)
    random_erasing_aspect: float = 0.3
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def active(self) -> bool:
        return (
            self.policy != "none" or self.cutout_size > 0 or self.random_erasing > 0 or self.mixes
        )


# --- RandAugment / TrivialAugment operations on one float image [H, W, C] of 0-255 values ---


def _blend(image: jnp.ndarray, other: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
    """PIL's ImageEnhance: `other` at factor 0, the image at 1, extrapolated beyond."""
    return other + factor * (image - other)


def _grey(image: jnp.ndarray) -> jnp.ndarray:
    """Luma [H, W, 1] with ITU-R 601-2 weights (PIL's convert("L"))."""
    return (image @ jnp.asarray([0.299, 0.587, 0.114], image.dtype))[..., None]


def _sample(image: jnp.ndarray, source: jnp.ndarray) -> jnp.ndarray:
    """Pixel (r, c) of the output is the input's nearest to source[:, r, c]; black outside."""
    return jax.vmap(
        lambda channel: jax.scipy.ndimage.map_coordinates(
            channel, list(source), order=0, mode="constant", cval=0.0
        ),
        in_axes=2,
        out_axes=2,
    )(image)


def _grid(height: int, width: int) -> jnp.ndarray:
    """float32 [2, height, width]: each pixel's (row, column)."""
    return jnp.stack(jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")).astype(
        jnp.float32
    )


def _affine(image: jnp.ndarray, matrix: jnp.ndarray, centre: jnp.ndarray) -> jnp.ndarray:
    """Output point q takes the input at matrix @ (q - centre) + centre, as PIL's transform.

    Points are (row, column) with pixel (r, c) covering [r, r + 1) x [c, c + 1), so that
    its centre (r + 0.5, c + 0.5) is what gets mapped (PIL's convention).
    """
    height, width, _ = image.shape
    points = _grid(height, width).reshape(2, -1) + 0.5 - centre[:, None]
    source = matrix @ points + centre[:, None] - 0.5
    return _sample(image, jnp.floor(source + 0.5).reshape(2, height, width))


_ORIGIN = jnp.zeros(2, jnp.float32)


def _identity(image, _):
    return image


def _shear_x(image, m):
    return _affine(image, jnp.asarray([[1.0, 0.0], [m, 1.0]]), _ORIGIN)


def _shear_y(image, m):
    return _affine(image, jnp.asarray([[1.0, m], [0.0, 1.0]]), _ORIGIN)


def _translate_x(image, pixels):
    return _shift(image, 0.0, pixels)


def _translate_y(image, pixels):
    return _shift(image, pixels, 0.0)


def _shift(image, rows, cols):
    height, width, _ = image.shape
    offset = jnp.stack([jnp.round(rows), jnp.round(cols)]).astype(jnp.float32)
    return _sample(image, _grid(height, width) - offset[:, None, None])


def _rotate(image, degrees):
    height, width, _ = image.shape
    angle = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    centre = jnp.asarray([height / 2, width / 2], jnp.float32)
    # Counter-clockwise for positive degrees, as PIL's Image.rotate.
    return _affine(image, jnp.asarray([[cos, sin], [-sin, cos]]), centre)


def _brightness(image, m):
    return _blend(image, jnp.zeros_like(image), 1.0 + m)


def _color(image, m):
    return _blend(image, _grey(image), 1.0 + m)


def _contrast(image, m):
    return _blend(image, jnp.mean(_grey(image)), 1.0 + m)


def _sharpness(image, m):
    # PIL's SMOOTH filter on the interior; the border keeps its pixels.
    kernel = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = jax.vmap(
        lambda channel: jax.scipy.signal.convolve2d(channel, kernel, mode="same"),
        in_axes=2,
        out_axes=2,
    )(image)
    height, width, _ = image.shape
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
    smooth = jnp.where(interior[..., None], jnp.round(smooth), image)
    return _blend(image, smooth, 1.0 + m)


def _posterize(image, bits):
    step = 2.0 ** (8.0 - bits)
    return jnp.floor(image / step) * step


def _solarize(image, threshold):
    return jnp.where(image >= threshold, 255.0 - image, image)


def _autocontrast(image, _):
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    stretched = (image - low) * (255.0 / jnp.maximum(high - low, 1.0))
    return jnp.where(high > low, stretched, image)


def _equalize_channel(channel: jnp.ndarray) -> jnp.ndarray:
    """PIL's ImageOps.equalize on one channel of integer values 0-255."""
    values = channel.astype(jnp.int32).reshape(-1)
    histogram = jnp.bincount(values, length=256)
    last = histogram[jnp.max(jnp.where(histogram > 0, jnp.arange(256), 0))]
    step = (values.size - last) // 255
    lut = (jnp.cumsum(histogram) - histogram + step // 2) // jnp.maximum(step, 1)
    equalized = jnp.clip(lut, 0, 255)[values].reshape(channel.shape).astype(channel.dtype)
    return jnp.where(step > 0, equalized, channel)


def _equalize(image, _):
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(image)


# (name, operation, magnitude of bin b of 31 for RandAugment, for TrivialAugment, signed).
def _bins(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, NUM_BINS, dtype=np.float32)


def _posterize_bins(lowest_bits: int) -> np.ndarray:
    return (8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / (8 - lowest_bits)))).astype(
        np.float32
    )


def operations(image_size: int) -> list[tuple[str, Callable, np.ndarray, np.ndarray, bool]]:
    """The 14 operations of both policies with their magnitudes by bin (torchvision's)."""
    zeros = np.zeros(NUM_BINS, np.float32)
    return [
        ("identity", _identity, zeros, zeros, False),
        ("shear_x", _shear_x, _bins(0, 0.3), _bins(0, 0.99), True),
        ("shear_y", _shear_y, _bins(0, 0.3), _bins(0, 0.99), True),
        ("translate_x", _translate_x, _bins(0, 150 / 331 * image_size), _bins(0, 32), True),
        ("translate_y", _translate_y, _bins(0, 150 / 331 * image_size), _bins(0, 32), True),
        ("rotate", _rotate, _bins(0, 30), _bins(0, 135), True),
        ("brightness", _brightness, _bins(0, 0.9), _bins(0, 0.99), True),
        ("color", _color, _bins(0, 0.9), _bins(0, 0.99), True),
        ("contrast", _contrast, _bins(0, 0.9), _bins(0, 0.99), True),
        ("sharpness", _sharpness, _bins(0, 0.9), _bins(0, 0.99), True),
        ("posterize", _posterize, _posterize_bins(4), _posterize_bins(2), False),
        ("solarize", _solarize, _bins(255, 0), _bins(255, 0), False),
        ("autocontrast", _autocontrast, zeros, zeros, False),
        ("equalize", _equalize, zeros, zeros, False),
    ]


def apply_operation(image: jnp.ndarray, op: jnp.ndarray, magnitude: jnp.ndarray) -> jnp.ndarray:
    """Operation number `op` of `operations` at `magnitude`, rounded to integers 0-255."""
    branches = [fn for _, fn, _, _, _ in operations(image.shape[0])]
    out = jax.lax.switch(op, branches, image, magnitude)
    return jnp.clip(jnp.round(out), 0.0, 255.0)


def draw_policy(
    key: jax.Array, batch: int, settings: Settings, image_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Operations int32 [batch, n] and their signed magnitudes float32 [batch, n].

    RandAugment: n = randaugment_num_ops operations drawn uniformly (with repeats), all at
    bin randaugment_magnitude. TrivialAugment: one operation, its bin drawn uniformly.
    Signed operations take either sign with probability 1/2.
    """
    table = operations(image_size)
    if settings.policy == "randaugment":
        num_ops, column = settings.randaugment_num_ops, 2
    else:
        num_ops, column = 1, 3
    magnitudes = jnp.asarray(np.stack([row[column] for row in table]))
    signed = jnp.asarray([row[4] for row in table])
    op_key, bin_key, sign_key = jax.random.split(key, 3)
    ops = jax.random.randint(op_key, (batch, num_ops), 0, len(table))
    if settings.policy == "randaugment":
        bins = jnp.full((batch, num_ops), settings.randaugment_magnitude)
    else:
        bins = jax.random.randint(bin_key, (batch, num_ops), 0, NUM_BINS)
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (batch, num_ops)), -1.0, 1.0)
    values = magnitudes[ops, bins] * jnp.where(signed[ops], signs, 1.0)
    return ops, values


def apply_policy(images: jnp.ndarray, ops: jnp.ndarray, magnitudes: jnp.ndarray) -> jnp.ndarray:
    """Each image [B, H, W, C] (values 0-255) through its operations, in order."""

    def one(image, image_ops, image_magnitudes):
        for i in range(image_ops.shape[0]):
            image = apply_operation(image, image_ops[i], image_magnitudes[i])
        return image

    return jax.vmap(one)(images.astype(jnp.float32), ops, magnitudes)


# --- Cutout and random erasing: boxes [B, 4] as (top, left, height, width) ---


def box_mask(boxes: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """bool [B, height, width]: True inside each image's box."""
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def draw_cutout(key: jax.Array, batch: int, height: int, width: int, size: int) -> jnp.ndarray:
    """Cutout's squares: side `size` centred on a uniform pixel, clipped at the borders."""
    centre = jax.random.randint(key, (batch, 2), 0, jnp.asarray([height, width]))
    low = jnp.clip(centre - size // 2, 0, jnp.asarray([height, width]))
    high = jnp.clip(centre + size // 2, 0, jnp.asarray([height, width]))
    return jnp.concatenate([low, high - low], axis=1)


def draw_erasing(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    probability: float,
    area: tuple[float, float],
    min_aspect: float,
    attempts: int = 10,
) -> jnp.ndarray:
    """Random erasing's rectangles; an image not erased gets an empty box.

    With `probability`, up to `attempts` (area fraction uniform in `area`, aspect ratio
    log-uniform in [min_aspect, 1 / min_aspect]) draws are made and the first that fits
    inside the image is placed uniformly: the procedure of torchvision's RandomErasing.
    """
    erase_key, area_key, aspect_key, place_key = jax.random.split(key, 4)
    shape = (batch, attempts)
    target = jax.random.uniform(area_key, shape, minval=area[0], maxval=area[1]) * height * width
    log_aspect = jax.random.uniform(
        aspect_key, shape, minval=math.log(min_aspect), maxval=-math.log(min_aspect)
    )
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = jnp.argmax(fits, axis=1)
    pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]  # noqa: E731
    h, w = pick(h), pick(w)
    erased = jax.random.bernoulli(erase_key, probability, (batch,)) & fits.any(axis=1)
    place = jax.random.uniform(place_key, (batch, 2))
    top = jnp.floor(place[:, 0] * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(place[:, 1] * (width - w + 1)).astype(jnp.int32)
    return jnp.stack([top, left, jnp.where(erased, h, 0), jnp.where(erased, w, 0)], axis=1)


# --- mixup and CutMix: one weight per batch, the batch mixed with its reverse ---


def draw_mix(key: jax.Array, settings: Settings, height: int, width: int) -> dict[str, jnp.ndarray]:
    """This batch's mixing: {"weight": of the original images, "box": CutMix's, or empty}.

    The batch is mixed with probability mix_prob; then CutMix with probability
    mix_switch_prob when both alphas are set (else the one set). The weight is drawn from
    Beta(alpha, alpha); CutMix's box has area (1 - weight) of the image, centred on a
    uniform pixel and clipped, and the weight becomes the area actually kept.
    """
    apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 5)
    mixed = jax.random.bernoulli(apply_key, settings.mix_prob)
    if settings.mixup_alpha > 0 and settings.cutmix_alpha > 0:
        cutmix = jax.random.bernoulli(switch_key, settings.mix_switch_prob)
    else:
        cutmix = jnp.asarray(settings.cutmix_alpha > 0)
    mixup_weight = (
        jax.random.beta(mixup_key, settings.mixup_alpha, settings.mixup_alpha)
        if settings.mixup_alpha > 0
        else jnp.float32(1.0)
    )
    cut_weight = (
        jax.random.beta(cutmix_key, settings.cutmix_alpha, settings.cutmix_alpha)
        if settings.cutmix_alpha > 0
        else jnp.float32(1.0)
    )
    ratio = jnp.sqrt(1.0 - cut_weight)
    size = jnp.floor(jnp.asarray([height, width]) * ratio).astype(jnp.int32)
    centre = jax.random.randint(box_key, (2,), 0, jnp.asarray([height, width]))
    low = jnp.clip(centre - size // 2, 0, jnp.asarray([height, width]))
    high = jnp.clip(centre + size // 2, 0, jnp.asarray([height, width]))
    box = jnp.where(mixed & cutmix, jnp.concatenate([low, high - low]), 0)
    kept = 1.0 - box[2] * box[3] / (height * width)
    weight = jnp.where(mixed, jnp.where(cutmix, kept, mixup_weight), 1.0)
    return {"weight": weight.astype(jnp.float32), "box": box}


def apply_mix(images: jnp.ndarray, mix: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """Images [B, H, W, C] mixed with the reversed batch as `mix` (from `draw_mix`) says.

    Example i keeps mix["weight"] of itself and takes the rest from example B - 1 - i:
    blended pixel by pixel (mixup) or pasted inside the box (CutMix).
    """
    partner = images[::-1]
    _, height, width, _ = images.shape
    inside = box_mask(mix["box"][None], height, width)[0][None, :, :, None]
    has_box = mix["box"][2] * mix["box"][3] > 0
    weight = mix["weight"]
    blended = weight * images + (1.0 - weight) * partner
    return jnp.where(has_box, jnp.where(inside, partner, images), blended)


def augment_batch(
    settings: Settings,
    seed: int,
    step: jnp.ndarray,
    images: jnp.ndarray,
    normalize: Callable[[jnp.ndarray], jnp.ndarray],
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The whole sequence of the module docstring on one global batch of train step `step`.

    Args:
      settings: which augmentations, with their parameters.
      seed: the run's seed.
      step: the step's number (the state's step before the update).
      images: uint8 [B, H, W, C], cropped and flipped.
      normalize: uint8-range images to the model's input.

    Returns:
      (the normalised, augmented images; the weight of each example's own label, a
      float32 scalar, the reversed batch's labels taking the rest; None without mixing).
    """
    batch, height, width, _ = images.shape
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), splits.STEP_AUGMENT_TAG), step
    )
    policy_key, cutout_key, erasing_key, mix_key = jax.random.split(key, 4)
    if settings.policy != "none":
        images = apply_policy(images, *draw_policy(policy_key, batch, settings, height))
    images = normalize(images)
    erase = jnp.zeros((batch, height, width), bool)
    if settings.cutout_size > 0:
        boxes = draw_cutout(cutout_key, batch, height, width, settings.cutout_size)
        erase |= box_mask(boxes, height, width)
    if settings.random_erasing > 0:
        boxes = draw_erasing(
            erasing_key,
            batch,
            height,
            width,
            settings.random_erasing,
            settings.random_erasing_area,
            settings.random_erasing_aspect,
        )
        erase |= box_mask(boxes, height, width)
    if settings.cutout_size > 0 or settings.random_erasing > 0:
        images = jnp.where(erase[..., None], 0.0, images)
    if not settings.mixes:
        return images, None
    mix = draw_mix(mix_key, settings, height, width)
    return apply_mix(images, mix), mix["weight"]
