"""Checks a config as soon as it is read, so a bad value fails before any work starts."""

import ml_collections

from resnet_jax.compile_options import CPU_CONVOLUTIONS
from resnet_jax.models import validate_model_config

LR_SCHEDULES = ("cosine", "multistep", "piecewise", "constant")
# How batches reach the devices (resnet_jax/data/__init__.py).
INPUT_MODES = ("auto", "device", "stream")
AUGMENTATIONS = ("crop_flip", "random_resized_crop")


class ConfigError(ValueError):
    """A config value is invalid; the message names it and says what is accepted."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first invalid value found."""
    try:
        validate_model_config(config.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(
        bool(config.dataset) and isinstance(config.dataset, str),
        "dataset must be cifar10, cifar100, image_folder or a tensorflow-datasets name.",
    )
    _require(
        config.input in INPUT_MODES,
        f"Unknown input {config.input!r}. Valid choices: {', '.join(INPUT_MODES)}.",
    )
    _require(
        config.augment in AUGMENTATIONS,
        f"Unknown augment {config.augment!r}. Valid choices: {', '.join(AUGMENTATIONS)} "
        "(crop_flip for CIFAR-like data, random_resized_crop for ImageNet-like data).",
    )
    _require(
        not (config.input == "device" and config.augment != "crop_flip"),
        f"input=device crops and flips the stored images only; augment={config.augment} "
        "needs the original files: use --config.input=stream (or auto).",
    )
    _require(
        config.cpu_convolutions in CPU_CONVOLUTIONS,
        f"Unknown cpu_convolutions {config.cpu_convolutions!r}. Valid choices: "
        f"{', '.join(CPU_CONVOLUTIONS)} (see resnet_jax/compile_options.py).",
    )
    _require(
        config.input_workers >= -1,
        f"input_workers={config.input_workers} must be -1 (one per core), 0 (none) or more.",
    )
    for key in (
        "batch_size",
        "eval_batch_size",
        "image_size",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        value = config[key]
        _require(value > 0, f"{key}={value} must be a positive integer.")
    _require(
        config.eval_resize_size == 0 or config.eval_resize_size >= config.image_size,
        f"eval_resize_size={config.eval_resize_size} must be 0 (resize whole images) or at "
        f"least image_size={config.image_size} (resize the shorter side, then centre-crop).",
    )
    _require(config.crop_padding >= 0, f"crop_padding={config.crop_padding} must be >= 0.")
    _require(
        isinstance(config.seed, int) and config.seed >= 0,
        f"seed={config.seed} must be a non-negative integer.",
    )
    _require(
        config.num_train_steps > 0 or (config.num_train_steps == -1 and config.num_epochs > 0),
        f"num_train_steps={config.num_train_steps}, num_epochs={config.num_epochs}: set "
        "num_train_steps to a positive count, or to -1 with num_epochs > 0.",
    )
    _require(config.learning_rate > 0, f"learning_rate={config.learning_rate} must be positive.")
    _require(
        config.lr_schedule in LR_SCHEDULES,
        f"Unknown lr_schedule {config.lr_schedule!r}. Valid choices: {', '.join(LR_SCHEDULES)}.",
    )
    _require(
        0 < config.lr_decay_factor <= 1,
        f"lr_decay_factor={config.lr_decay_factor} must be in (0, 1].",
    )
    _require(
        list(config.lr_decay_steps) == sorted(config.lr_decay_steps)
        and list(config.lr_decay_epochs) == sorted(config.lr_decay_epochs),
        "lr_decay_steps and lr_decay_epochs must be increasing.",
    )
    _require(config.warmup_epochs >= 0, f"warmup_epochs={config.warmup_epochs} must be >= 0.")
    _require(0 <= config.momentum < 1, f"momentum={config.momentum} must be in [0, 1).")
    _require(config.weight_decay >= 0, f"weight_decay={config.weight_decay} must be >= 0.")
    _require(
        0 <= config.label_smoothing < 1,
        f"label_smoothing={config.label_smoothing} must be in [0, 1).",
    )
    _require(config.profile_num_steps >= 0, "profile_num_steps must be >= 0 (0 disables).")
    checkpoint = str(config.eval_checkpoint)
    _require(
        checkpoint in ("latest", "best") or (checkpoint.isdigit()),
        f"eval_checkpoint={config.eval_checkpoint!r} must be 'latest', 'best' or a step number.",
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
