"""Checks a config as soon as it is read, so a bad value fails before any work starts."""

import math

import ml_collections

from resnet_jax.compile_options import CPU_CONVOLUTIONS
from resnet_jax.models import validate_model_config

LR_SCHEDULES = ("cosine", "multistep", "piecewise", "constant")
WARMUP_KINDS = ("linear", "constant")
# How batches reach the devices (resnet_jax/data/__init__.py).
INPUT_MODES = ("auto", "device", "stream")
AUGMENTATIONS = ("crop_flip", "random_resized_crop")
# Decoders of the stream path's Inception crop (resnet_jax/data/decode.py's DECODERS).
STREAM_DECODERS = ("opencv", "pil")
# The train step's augmentation policies, and their number of magnitude bins
# (resnet_jax/data/augment.py).
POLICIES = ("none", "randaugment", "trivialaugment")
MAGNITUDE_BINS = 31
# The weights an evaluation, predict or export reads from a checkpoint.
EVAL_WEIGHTS = ("raw", "ema")


class ConfigError(ValueError):
    """A config value is invalid; the message names it and says what is accepted."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool): inf and nan are nobody's setting."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _probability(value) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _name(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _optional_path(value) -> bool:
    return value is None or _name(value)


def _increasing(items, positive) -> bool:
    return (
        isinstance(items, (tuple, list))
        and all(positive(item) for item in items)
        and list(items) == sorted(items)
    )


_BOOL = (lambda value: isinstance(value, bool), "True or False")
_POSITIVE_INT = (_positive_int, "a positive integer")

# Each other top-level key, checked on its own value whatever the other keys say: (test, what
# the value must be). tests/test_config_checks.py holds every key of resnet_jax/defaults.py
# to an entry here or in CHOICES (the model's keys: models.validate_model_config).
RANGES = {
    "dataset": (_name, "cifar10, cifar100, image_folder or a tensorflow-datasets name"),
    "train_split": (_name, "a split name (a tfds split, or an image folder's subfolder)"),
    "eval_split": (_name, "a split name (a tfds split, or an image folder's subfolder)"),
    "input_workers": (
        lambda v: _is_int(v) and v >= -1,
        "-1 (one per core), 0 (none) or more",
    ),
    "data_dir": (_optional_path, "unset (tfds's default folder) or a folder"),
    "manual_dir": (_optional_path, "unset or the folder holding the dataset's archive"),
    "image_size": _POSITIVE_INT,
    "eval_resize_size": (
        lambda v: _is_int(v) and v >= 0,
        "0 (resize whole images) or a size to resize the shorter side to",
    ),
    "crop_padding": (lambda v: _is_int(v) and v >= 0, ">= 0"),
    "random_flip": _BOOL,
    "randaugment_num_ops": _POSITIVE_INT,
    "randaugment_magnitude": (
        lambda v: _is_int(v) and 0 <= v < MAGNITUDE_BINS,
        f"a magnitude bin from 0 to {MAGNITUDE_BINS - 1}",
    ),
    "cutout_size": (lambda v: _is_int(v) and v >= 0, ">= 0 pixels (0 disables)"),
    "random_erasing": (_probability, "a probability in [0, 1] (0 disables)"),
    "random_erasing_area": (
        lambda v: (
            isinstance(v, (tuple, list))
            and len(v) == 2
            and all(_is_number(x) for x in v)
            and 0 < v[0] <= v[1] < 1
        ),
        "(low, high) fractions of the image with 0 < low <= high < 1",
    ),
    "random_erasing_aspect": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
    "mixup_alpha": (lambda v: _is_number(v) and v >= 0, ">= 0 (0 disables)"),
    "cutmix_alpha": (lambda v: _is_number(v) and v >= 0, ">= 0 (0 disables)"),
    "mix_prob": (_probability, "a probability in [0, 1]"),
    "mix_switch_prob": (_probability, "a probability in [0, 1]"),
    "batch_size": _POSITIVE_INT,
    "eval_batch_size": _POSITIVE_INT,
    "num_epochs": (
        lambda v: _is_number(v) and v > 0,
        "positive (it sets the length when num_train_steps is -1)",
    ),
    "num_train_steps": (
        lambda v: _is_int(v) and (v > 0 or v == -1),
        "a positive step count, or -1 to derive it from num_epochs",
    ),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "positive"),
    "lr_decay_factor": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
    "lr_decay_steps": (
        lambda v: _increasing(v, _positive_int),
        "increasing positive step numbers",
    ),
    "lr_decay_epochs": (
        lambda v: _increasing(v, lambda e: _is_number(e) and e > 0),
        "increasing positive epochs",
    ),
    "warmup_epochs": (lambda v: _is_number(v) and v >= 0, ">= 0"),
    "warmup_factor": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "nesterov": _BOOL,
    "weight_decay": (lambda v: _is_number(v) and v >= 0, ">= 0"),
    "weight_decay_all": _BOOL,
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "sam_rho": (lambda v: _is_number(v) and v >= 0, ">= 0 (0 disables)"),
    "ema_decay": (lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1) (0 disables)"),
    "ema_warmup": _BOOL,
    "eval_flip": _BOOL,
    "half_precision": _BOOL,
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "deterministic": _BOOL,
    "allow_schedule_change": _BOOL,
    "log_every_steps": _POSITIVE_INT,
    "eval_every_steps": _POSITIVE_INT,
    "checkpoint_every_steps": _POSITIVE_INT,
    "keep_checkpoints": _POSITIVE_INT,
    "profile_num_steps": (lambda v: _is_int(v) and v >= 0, ">= 0 (0 disables)"),
    "eval_checkpoint": (
        lambda v: str(v) in ("latest", "best") or str(v).isdigit(),
        "'latest', 'best' or a step number",
    ),
}
# The keys that take one of a few names: (the names, what the error adds).
CHOICES = {
    "input": (INPUT_MODES, ""),
    "augment": (
        AUGMENTATIONS,
        " (crop_flip for CIFAR-like data, random_resized_crop for ImageNet-like data)",
    ),
    "stream_decoder": (
        STREAM_DECODERS,
        " (opencv: faster, resize without antialiasing; pil: antialiased, as torchvision)",
    ),
    "lr_schedule": (LR_SCHEDULES, ""),
    "warmup_kind": (WARMUP_KINDS, " (constant: learning_rate x warmup_factor, as the paper)"),
    "policy": (POLICIES, " (see resnet_jax/data/augment.py)"),
    "eval_weights": (EVAL_WEIGHTS, " (ema needs a run trained with ema_decay > 0)"),
    "cpu_convolutions": (CPU_CONVOLUTIONS, " (see resnet_jax/compile_options.py)"),
}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first invalid value found.

    Every value is checked on its own first (RANGES), used or not, then the combinations.
    """
    try:
        validate_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, (choices, hint) in CHOICES.items():
        _require(
            config[key] in choices,
            f"Unknown {key} {config[key]!r}. Valid choices: {', '.join(choices)}{hint}.",
        )
    for key, (ok, expected) in RANGES.items():
        _require(ok(config[key]), f"{key}={config[key]!r} must be {expected}.")
    _require(
        not (config.input == "device" and config.augment != "crop_flip"),
        f"input=device crops and flips the stored images only; augment={config.augment} "
        "needs the original files: use --config.input=stream (or auto).",
    )
    _require(
        config.eval_resize_size == 0 or config.eval_resize_size >= config.image_size,
        f"eval_resize_size={config.eval_resize_size} must be 0 (resize whole images) or at "
        f"least image_size={config.image_size} (resize the shorter side, then centre-crop).",
    )


def resolve_num_classes(config: ml_collections.ConfigDict, dataset_classes: int) -> int:
    """The model's output count: the dataset's, unless the config sets a compatible one.

    Raises:
      ConfigError: model.num_classes is set below the dataset's number of classes.
    """
    wanted = config.model.num_classes
    if wanted is not None and wanted < dataset_classes:
        raise ConfigError(
            f"model.num_classes={wanted} but dataset {config.dataset!r} has {dataset_classes} "
            f"classes. Unset it or use --config.model.num_classes={dataset_classes}."
        )
    return wanted or dataset_classes
