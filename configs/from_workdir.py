"""The config a run was made with, read from its workdir's config.json.

    python -m resnet_jax.main --config configs/from_workdir.py:runs/resnet18 \
        --workdir runs/resnet18 --mode=eval

Evaluates (or continues) a run with its own settings without repeating them, including
runs made by `python -m resnet_jax.import_torch`. Keys the run did not record keep
their defaults (resnet_jax/defaults.py), and `--config.key=value` still overrides any of
them (for example `--config.data_dir=...` on another machine).
"""

import ml_collections

from resnet_jax import defaults


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
    return defaults.from_workdir(workdir)
