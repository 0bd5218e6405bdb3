"""Every config key is range-checked at start-up, whether or not other keys make it unused."""

import ml_collections
import pytest
from helpers import run_main

from resnet_jax import config_checks, defaults

# One bad value per key, chosen here (not read from config_checks), with the other keys
# left at values that would make many of them unused: num_train_steps is set, so
# num_epochs is not read; the schedule is cosine, so the decay keys are not read; the
# input is the device path, so input_workers is not read.
BAD = {
    "dataset": "",
    "train_split": " ",
    "eval_split": "",
    "input": "gpu",
    "input_workers": -2,
    "data_dir": "",
    "manual_dir": "",
    "image_size": 0,
    "eval_resize_size": -1,
    "augment": "mixup",
    "stream_decoder": "turbo",
    "crop_padding": -4,
    "random_flip": "yes",
    "batch_size": 0,
    "eval_batch_size": -500,
    "num_epochs": -3.0,
    "num_train_steps": 0,
    "learning_rate": 0.0,
    "lr_schedule": "linear",
    "lr_decay_factor": 1.5,
    "lr_decay_steps": (48000, 32000),
    "lr_decay_epochs": (-1.0,),
    "warmup_epochs": -1.0,
    "warmup_factor": 0.0,
    "warmup_kind": "step",
    "momentum": 1.0,
    "nesterov": 1,
    "weight_decay": -5e-4,
    "weight_decay_all": None,
    "label_smoothing": 1.0,
    "half_precision": "bf16",
    "cpu_convolutions": "mkl",
    "seed": -1,
    "deterministic": 0,
    "allow_schedule_change": "no",
    "log_every_steps": 0,
    "eval_every_steps": -1,
    "checkpoint_every_steps": 0,
    "keep_checkpoints": 0,
    "profile_num_steps": -5,
    "eval_checkpoint": "newest",
    "policy": "autoaugment",
    "randaugment_num_ops": 0,
    "randaugment_magnitude": 31,
    "cutout_size": -16,
    "random_erasing": 1.5,
    "random_erasing_area": (0.4, 0.02),
    "random_erasing_aspect": 3.0,
    "mixup_alpha": -0.2,
    "cutmix_alpha": "1",
    "mix_prob": -0.1,
    "mix_switch_prob": 2.0,
    "sam_rho": -0.05,
    "ema_decay": 1.0,
    "ema_warmup": "on",
    "eval_weights": "average",
    "eval_flip": 1,
}
BAD_MODEL = {
    "name": "resnet19",
    "stem": "deep",
    "shortcut": "C",
    "num_classes": 0,
    "width_multiplier": 0.0,
    "zero_init_residual": "true",
    "bn_momentum": 1.0,
    "bn_epsilon": 0.0,
    "growth_rate": 0,
    "compression": 0.0,
    "memory_efficient": 1,
}


def _config():
    """The defaults, with type safety off so that any value can be put in."""
    config = ml_collections.ConfigDict(defaults.get_config().to_dict(), type_safe=False)
    config.num_train_steps = 100
    config.input = "device"
    return config


def test_every_default_key_has_a_bad_value_here():
    config = defaults.get_config()
    assert set(BAD) == set(config) - {"model"}
    assert set(BAD_MODEL) == set(config.model)
    assert set(BAD) == set(config_checks.RANGES) | set(config_checks.CHOICES)
    config_checks.validate(_config())  # The defaults themselves pass.


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_bad_value_is_refused_by_name(key):
    config = _config()
    config[key] = BAD[key]
    with pytest.raises(config_checks.ConfigError) as error:
        config_checks.validate(config)
    message = str(error.value)
    assert message.startswith((f"{key}={BAD[key]!r} must be ", f"Unknown {key} {BAD[key]!r}."))
    assert "\n" not in message


@pytest.mark.parametrize(
    "key,value",
    [("num_epochs", float("inf")), ("learning_rate", float("nan")), ("weight_decay", float("inf"))],
)
def test_infinite_and_nan_numbers_are_refused(key, value):
    # --config.num_epochs=inf parses as a float and had passed, to fail at int(inf).
    config = _config()
    config[key] = value
    with pytest.raises(config_checks.ConfigError, match=rf"^{key}={value!r} must be "):
        config_checks.validate(config)


@pytest.mark.parametrize("key", sorted(BAD_MODEL))
def test_each_bad_model_value_is_refused_by_name(key):
    config = _config()
    config.model[key] = BAD_MODEL[key]
    if key == "zero_init_residual":
        config.model.name = "resnet20"
    with pytest.raises(config_checks.ConfigError, match=key if key != "name" else "resnet19"):
        config_checks.validate(config)


def test_an_unused_bad_value_fails_the_command_in_one_line():
    result = run_main(
        "--config",
        "configs/paper_cifar10.py:20",
        "--config.num_train_steps=10",
        "--config.num_epochs=-3",
        "--mode=summary",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: num_epochs=-3.0 must be positive (it sets the length when num_train_steps is -1)."
    )


def test_stream_decoders_are_the_decode_modules():
    from resnet_jax.data import decode

    assert config_checks.STREAM_DECODERS == decode.DECODERS == ("opencv", "pil")
