"""Turn a PyTorch ResNet `state_dict` into a checkpoint of this project.

    python -m resnet_jax.import_torch --model resnet50 --state_dict resnet50.pth \
        --workdir runs/resnet50_torchvision

Two layouts are understood, told apart by their keys:
- torchvision's ResNets (resnet18/34/50/101/152; `downsample.0/1`, `fc`), with the
  ImageNet stem (7x7 conv, then max-pool) or a 3x3 stem, and any number of classes;
- the common PyTorch CIFAR ResNets: a 3x3 stem, `layer1.0.conv1`, ..., projection
  shortcuts in `shortcut.0/1` (or `downsample.0/1`), or none at all (option A, as in the
  resnet20/32/44/56/110 nets), and a `linear` (or `fc`) head.

The checkpoint (step 0 of WORKDIR/checkpoints, with WORKDIR/config.json) records the
preprocessing the weights expect, so `python -m resnet_jax.predict` and `--mode=eval`
with `--config configs/from_workdir.py:WORKDIR` use it: torchvision's evaluation
transform for ImageNet-stem weights (shorter side to 256, centre 224 crop, ImageNet mean
and std), the dataset's 32x32 normalisation for CIFAR weights (`--dataset`).

The file is read with `torch.load(..., weights_only=True)`: tensors and plain containers
only, never pickled code. torch is an optional dependency: `pip install -e ".[torch]"`.
"""

import hashlib
import pathlib
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import app, flags

from resnet_jax import checkpointing, cli, config_checks, data, defaults, steps
from resnet_jax.models import ResNet, create_model, model_constructor

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string(
        "model", None, "Model name of this project: resnet18 ... resnet152, resnet56, ..."
    )
    flags.DEFINE_string("state_dict", None, "PyTorch file holding the state_dict (.pth, .pt).")
    flags.DEFINE_string("workdir", None, "New run directory to write the checkpoint into.")
    flags.DEFINE_enum(
        "dataset",
        None,
        ["imagenet", "cifar10", "cifar100"],
        "Whose preprocessing the weights expect. Default: imagenet for a 7x7 stem; for a 3x3 "
        "stem, cifar10 or cifar100 by the number of classes.",
    )
    flags.DEFINE_string(
        "class_names", None, "Text file with one class name per line, in label order."
    )
    flags.DEFINE_string(
        "data_dir", None, "tfds data_dir where CIFAR is prepared, to take its class names from."
    )
    cli.require_flag("model", "the model of the weights (e.g. --model resnet18)")
    cli.require_flag(
        "state_dict", "the PyTorch file of the weights (e.g. --state_dict resnet18-f37072fd.pth)"
    )
    cli.require_flag(
        "workdir", "the new run folder to write the checkpoint into (e.g. --workdir runs/imported)"
    )


# Containers in which training scripts commonly save the state_dict.
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network")
_IGNORED = re.compile(r".*num_batches_tracked$")
# Stage widths of the stems' families before a width multiplier.
_BASE_WIDTH = {"torchvision": 64, "paper": 16}


class ConversionError(ValueError):
    """The file does not hold weights of the named model; the message lists what differs."""


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The file's tensors as float32 numpy arrays, keys without a DataParallel `module.`."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            'PyTorch is not installed: pip install -e ".[torch]" (a CPU build is enough).'
        ) from e
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path} does not exist: pass the state_dict file's path.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle and zip errors have many types.
        raise ConversionError(
            f"Cannot load {path} with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Only tensors and plain containers "
            "are accepted; a file that needs pickled code is refused. Save "
            "model.state_dict() with torch.save."
        ) from e
    if isinstance(loaded, dict):
        for key in _WRAPPERS:
            if isinstance(loaded.get(key), dict) and not torch.is_tensor(loaded.get(key)):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConversionError(
            f"{path} does not hold a state_dict (a dict of tensors, possibly under one of "
            f"{', '.join(_WRAPPERS)})."
        )
    tensors = {}
    for key, value in loaded.items():
        key = key.removeprefix("module.")
        if not _IGNORED.match(key):
            tensors[key] = value.detach().to(torch.float32).numpy()
    return tensors


def _torch_module(names: tuple[str, ...], shortcut: str, head: str) -> str:
    """Our module path (e.g. layer2_0/downsample_bn) as a PyTorch one (layer2.0.downsample.1)."""
    parts = []
    for name in names:
        if match := re.fullmatch(r"layer(\d+)_(\d+)", name):
            parts += [f"layer{match.group(1)}", match.group(2)]
        elif name == "downsample_conv":
            parts += [shortcut, "0"]
        elif name == "downsample_bn":
            parts += [shortcut, "1"]
        elif name == "fc":
            parts.append(head)
        else:
            parts.append(name)
    return ".".join(parts)


_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _to_flax(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # Conv: (out, in, h, w) -> (h, w, in, out).
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # Linear: (out, in) -> (in, out).
        return value.T
    return value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our array shape in PyTorch's layout (the inverse of `_to_flax`)."""
    if len(shape) == 4:  # (h, w, in, out) -> (out, in, h, w)
        return tuple(shape[i] for i in (3, 2, 0, 1))
    return tuple(shape[::-1])


def convert(tensors: dict[str, np.ndarray], template: Any) -> dict[str, Any]:
    """Fills `template` ({"params", "batch_stats"} of our model) from PyTorch tensors.

    Raises:
      ConversionError: listing the missing keys, the unexpected ones and the shapes that
        differ (in PyTorch's names and layout).
    """
    shortcut = "shortcut" if any(".shortcut." in k for k in tensors) else "downsample"
    head = "linear" if any(k.startswith("linear.") for k in tensors) else "fc"
    used, missing, wrong = set(), [], []

    def fill(path: tuple, leaf: Any) -> np.ndarray:
        names = tuple(str(p.key) for p in path)
        key = f"{_torch_module(names[1:-1], shortcut, head)}.{_LEAVES[names[0], names[-1]]}"
        if key not in tensors:
            missing.append(key)
            return np.zeros(leaf.shape, np.float32)
        used.add(key)
        value = _to_flax(tensors[key])
        if value.shape != leaf.shape:
            wrong.append(
                f"{key}: file {tuple(tensors[key].shape)}, model {_torch_shape(leaf.shape)}"
            )
        return value

    variables = jax.tree_util.tree_map_with_path(fill, template)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or wrong:
        parts = []
        for title, items in (
            ("missing from the file", sorted(missing)),
            ("unexpected in the file", unexpected),
            ("shapes that differ", sorted(wrong)),
        ):
            if items:
                listed = "\n    ".join(items[:30])
                more = f"\n    ... and {len(items) - 30} more" if len(items) > 30 else ""
                parts.append(f"  {len(items)} {title}:\n    {listed}{more}")
        raise ConversionError("The state_dict does not fit the model.\n" + "\n".join(parts))
    return variables


def import_config(
    model_name: str, tensors: dict[str, np.ndarray], dataset: str | None
) -> ml_collections.ConfigDict:
    """The config of a run whose model holds `tensors`, and the preprocessing they expect."""
    config = defaults.get_config()
    try:
        constructor = model_constructor(model_name)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if constructor.func is not ResNet:
        raise ConversionError(
            f"--model={model_name}: only ResNets can be imported (resnet18 ... resnet152, "
            "resnet<6n+2>, plain<d>); there is no converter for this model's layers."
        )
    if "conv1.weight" not in tensors:
        raise ConversionError(
            "The state_dict has no conv1.weight (the stem): not a ResNet of a known layout."
        )
    head = tensors.get("fc.weight", tensors.get("linear.weight"))
    if head is None:
        raise ConversionError("The state_dict has neither fc.weight nor linear.weight (the head).")
    stem_out, _, stem_size, _ = tensors["conv1.weight"].shape
    paper_net = constructor.keywords.get("stem") == "cifar"
    config.model.name = model_name
    config.model.num_classes = int(head.shape[0])
    config.model.width_multiplier = stem_out / _BASE_WIDTH["paper" if paper_net else "torchvision"]
    if paper_net:
        projections = any(".shortcut." in k or ".downsample." in k for k in tensors)
        config.model.shortcut = "B" if projections else "A"
        stem = "cifar"
    else:
        stem = "imagenet" if stem_size == 7 else "cifar"
        config.model.stem = stem
    if dataset is None:
        if stem == "imagenet":
            dataset = "imagenet"
        elif config.model.num_classes in (10, 100):
            dataset = f"cifar{config.model.num_classes}"
        else:
            raise ConversionError(
                f"Which preprocessing do these weights expect ({config.model.num_classes} "
                "classes, 3x3 stem)? Pass --dataset=cifar10, cifar100 or imagenet."
            )
    if dataset == "imagenet":
        # torchvision's evaluation transform; image folders normalise with ImageNet's stats.
        config.dataset = "image_folder"
        config.image_size = 224
        config.eval_resize_size = 256
    else:
        config.dataset = dataset
        config.image_size = 32
        config.eval_resize_size = 0
    config_checks.validate(config)
    return config


def _class_names(
    path: str | None, config: ml_collections.ConfigDict, count: int, data_dir: str | None
) -> list[str]:
    """Names from `path` (one per line), else from tfds's CIFAR metadata, else none."""
    if path:
        file = pathlib.Path(path).expanduser()
        if not file.is_file():
            raise ConversionError(f"--class_names={path}: no such file.")
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) != count:
            raise ConversionError(
                f"--class_names={path} lists {len(names)} names, but the model has {count} "
                "classes: one name per line, in label order."
            )
        return names
    if config.dataset in ("cifar10", "cifar100"):
        import tensorflow_datasets as tfds

        names = list(tfds.builder(config.dataset, data_dir=data_dir).info.features["label"].names)
        # Before the dataset is prepared, tfds only knows the names as numbers.
        if len(names) == count and not all(name.isdigit() for name in names):
            return names
    return []


def import_state_dict(
    model_name: str,
    state_dict_path: str,
    workdir: str,
    dataset: str | None = None,
    class_names_file: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Writes step 0 of WORKDIR/checkpoints from a PyTorch state_dict; returns a summary."""
    workdir_path = checkpointing.absolute_workdir(workdir)
    if workdir_path.exists() and not workdir_path.is_dir():
        raise checkpointing.CheckpointError(
            f"--workdir {workdir_path} is a file, not a folder; nothing was written. Import "
            "into a new --workdir."
        )
    if (workdir_path / checkpointing.CHECKPOINT_DIR).exists():
        raise checkpointing.CheckpointError(
            f"{workdir_path} already holds checkpoints; nothing was written. Import into a "
            "new --workdir."
        )
    tensors = load_state_dict(state_dict_path)
    config = import_config(model_name, tensors, dataset)
    class_names = _class_names(class_names_file, config, config.model.num_classes, data_dir)
    model = create_model(config.model, config.model.num_classes)
    template = steps.variables_template(model, config.image_size)
    variables = convert(tensors, template)
    tx = steps.create_optimizer(config, optax.constant_schedule(config.learning_rate))
    # On the device, as training's initialisation makes it (the step an int32 array).
    state = jax.device_put(
        steps.TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
        )
    )
    digest = hashlib.sha256(pathlib.Path(state_dict_path).expanduser().read_bytes()).hexdigest()
    source = {
        "state_dict": str(pathlib.Path(state_dict_path).expanduser().resolve()),
        "sha256": digest,
    }
    preprocessing = data.preprocessing(config)
    workdir_path.mkdir(parents=True, exist_ok=True)
    manager = checkpointing.create_manager(workdir_path)
    checkpointing.save(
        manager,
        state,
        config,
        {"imported": source, "class_names": class_names, "preprocessing": preprocessing},
    )
    manager.wait_until_finished()
    manager.close()
    (workdir_path / "config.json").write_text(config.to_json(indent=2) + "\n")
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
    return {
        "workdir": str(workdir_path),
        "model": model_name,
        "num_classes": config.model.num_classes,
        "num_params": num_params,
        "preprocessing": preprocessing,
        "class_names": bool(class_names),
        **source,
    }


def main(argv: list[str]) -> None:
    cli.start_command(argv)
    summary: dict[str, Any] = {}

    def run() -> None:
        summary.update(
            import_state_dict(
                FLAGS.model,
                FLAGS.state_dict,
                FLAGS.workdir,
                FLAGS.dataset,
                FLAGS.class_names,
                FLAGS.data_dir,
            )
        )

    cli.exit_on_user_error(run, extra=(ConversionError,))
    workdir = FLAGS.workdir
    print(
        f"Imported {summary['num_params']:,} parameters of {summary['model']} "
        f"({summary['num_classes']} classes) into {summary['workdir']}/checkpoints/0.\n"
        f"Classify images:  python -m resnet_jax.predict --workdir {workdir} IMAGE...\n"
        f"Evaluate:         python -m resnet_jax.main --config configs/from_workdir.py:{workdir} "
        f"--workdir {workdir} --mode=eval --config.data_dir=DATA"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
