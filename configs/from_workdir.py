"""The config a run was made with, read from its workdir's config.json.

    python -m resnet_jax.main --config configs/from_workdir.py:runs/resnet18 \
        --workdir runs/resnet18 --mode=eval

Evaluates (or continues) a run with its own settings without repeating them, including
runs made by `python -m resnet_jax.import_torch`. Keys the run did not record keep
their defaults from configs/default.py, and `--config.key=value` still overrides any of
them (for example `--config.data_dir=...` on another machine).
"""

import json
import pathlib
from typing import Any

import ml_collections

from configs import default

# Keys that older versions wrote and that no longer have an effect: skipped when read.
RETIRED_KEYS = {
    "model.conv_impl",  # The CPU weight gradient, superseded by `cpu_convolutions`.
}


def _overlay(
    config: ml_collections.ConfigDict, values: dict[str, Any], where: str, prefix: str = ""
) -> None:
    for key, value in values.items():
        if key not in config:
            if prefix + key in RETIRED_KEYS:
                continue
            raise ValueError(f"{where} has key {key!r}, which configs/default.py does not know")
        if isinstance(value, dict):
            _overlay(config[key], value, where, f"{prefix}{key}.")
        elif isinstance(value, list):
            config[key] = tuple(value)
        else:
            config[key] = value


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
    if not workdir:
        raise ValueError(
            "name the run: --config configs/from_workdir.py:WORKDIR (the folder holding "
            "config.json)"
        )
    path = pathlib.Path(workdir).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: WORKDIR in configs/from_workdir.py:WORKDIR must be a "
            "run's folder (it writes config.json when training starts)"
        )
    config = default.get_config()
    _overlay(config, json.loads(path.read_text()), str(path))
    return config
