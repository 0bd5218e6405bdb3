"""The run configuration: every key with its default and meaning, and a saved run's config.

`get_config()` is the base of every file in configs/ (through configs/default.py): they
change only what differs. Any value can be overridden on the command line, for example
`--config.batch_size=256 --config.model.name=plain20`. `from_workdir(WORKDIR)` is the
config a run was made with, read from its config.json (configs/from_workdir.py).
"""

import json
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict

# Keys that older versions wrote and that no longer have an effect: skipped when read.
RETIRED_KEYS = {
    "model.conv_impl",  # The CPU weight gradient, superseded by `cpu_convolutions`.
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    # resnet18/34/50/101/152 (torchvision family), resnet20/32/44/56/110/1202 or any
    # resnet<6n+2> (the paper's CIFAR nets), and a plain twin of each: plain18, plain56, ...;
    # densenet100/190/250 or any densenet<6n+4> (DenseNet-BC for CIFAR).
    config.model.name = "resnet18"
    # Stem of the torchvision family: "cifar" (3x3/1 conv, no max-pool) or
    # "imagenet" (7x7/2 conv + 3x3/2 max-pool). The paper's CIFAR nets always use 3x3/1.
    config.model.stem = "cifar"
    # Shortcut of the paper's CIFAR nets when the shape changes: "A" (subsample +
    # zero-pad channels, no parameters) or "B" (1x1 conv + BN projection).
    config.model.shortcut = "A"
    # None: the dataset's number of classes.
    config.model.num_classes = config_dict.placeholder(int)
    # Scales every width; of a DenseNet, its growth rate (see resnet_jax/models/__init__.py).
    config.model.width_multiplier = 1.0
    # Start each residual branch as the identity (last BN scale = 0). No effect on
    # plain nets, which have no shortcut to carry the signal; refused for DenseNets.
    config.model.zero_init_residual = False
    # Flax convention: running = momentum * running + (1 - momentum) * batch
    # (PyTorch's momentum=0.1 is 0.9 here).
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    # DenseNet only. Growth rate k: the feature maps each dense layer adds (the paper:
    # 12 for densenet100, 24 for densenet250, 40 for densenet190).
    config.model.growth_rate = 12
    # DenseNet only. The fraction of channels each transition keeps, in (0, 1]
    # (0.5: DenseNet-BC; 1.0: no compression).
    config.model.compression = 0.5
    # DenseNet only, ignored by ResNets (as growth_rate): recompute each layer's concat +
    # BN-ReLU-1x1 conv in the backward pass (Pleiss et al. 2017); same params, less memory.
    config.model.memory_efficient = False

    # cifar10, cifar100, image_folder (<data_dir>/<split>/<class>/*) or the name of any
    # tensorflow-datasets image classification dataset (classes from its metadata).
    config.dataset = "cifar100"
    # Splits to train on and to evaluate on (tfds split names, or image folder subfolders).
    config.train_split = "train"
    config.eval_split = "test"
    # How batches reach the devices: "device" (the training split lives on the
    # accelerators, augmented there), "stream" (grain reads, decodes and augments files in
    # worker processes; for datasets larger than memory; tfds datasets must be prepared as
    # array_record) or "auto" (device when the split fits, see resnet_jax/data/__init__.py).
    config.input = "auto"
    # Worker processes that decode and augment on the stream path; -1: one per core.
    config.input_workers = -1
    # tfds data directory (None: tfds's default, ~/tensorflow_datasets), or the image folder.
    config.data_dir = config_dict.placeholder(str)
    # Folder holding the dataset archive for offline preparation (cifar-100-binary.tar.gz).
    config.manual_dir = config_dict.placeholder(str)
    config.image_size = 32
    # How image files (image folders, predict) become image_size squares: 0 resizes the
    # whole image (CIFAR-like data); N resizes the shorter side to N and takes the central
    # crop (the ImageNet evaluation: 256, then 224 with image_size=224).
    config.eval_resize_size = 0
    # crop_flip: zero-pad by crop_padding, random crop back, random flip (CIFAR);
    # random_resized_crop: the Inception crop of 8-100% of the area (ImageNet; stream only).
    config.augment = "crop_flip"
    config.crop_padding = 4
    config.random_flip = True
    # What decodes and resizes random_resized_crop's JPEGs on the stream path: "opencv"
    # (libjpeg-turbo, bilinear resize without antialiasing, as TensorFlow's Inception crop;
    # about twice the images per host core) or "pil" (antialiased, as torchvision's).
    # Evaluation and predict always decode with PIL (resnet_jax/data/decode.py).
    config.stream_decoder = "opencv"

    # Augmentations of modern recipes, all off by default, run on the devices inside the
    # train step after the crop and flip, for both input paths (resnet_jax/data/augment.py).
    # Each is drawn from (seed, step), so a resumed run stays bitwise equal.
    # "randaugment" (Cubuk et al. 2020: randaugment_num_ops operations at magnitude bin
    # randaugment_magnitude of 0-30), "trivialaugment" (Mueller and Hutter 2021: one
    # operation at a random magnitude, torchvision's TrivialAugmentWide ranges) or "none".
    config.policy = "none"
    config.randaugment_num_ops = 2
    config.randaugment_magnitude = 9
    # Cutout (DeVries and Taylor 2017): a square of this side (pixels) centred on a random
    # pixel, clipped at the borders, set to the mean colour; 0 disables (16 for CIFAR).
    config.cutout_size = 0
    # Random erasing (Zhong et al. 2020): the probability an image gets a rectangle of
    # random_erasing_area (fractions of the image) and aspect ratio in
    # [random_erasing_aspect, 1 / random_erasing_aspect] set to the mean colour; 0 disables
    # (the paper: 0.5, (0.02, 0.4), 0.3).
    config.random_erasing = 0.0
    config.random_erasing_area = (0.02, 0.4)
    config.random_erasing_aspect = 0.3
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): Beta(alpha, alpha) mixing of
    # each batch with itself reversed, images and loss with the same weight; 0 disables
    # (mixup 0.2-1.0 and CutMix 1.0 are the papers' values). A batch is mixed with
    # probability mix_prob; with both alphas set, by CutMix with probability
    # mix_switch_prob, else by mixup.
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.mix_prob = 1.0
    config.mix_switch_prob = 0.5

    config.batch_size = 128  # Global, over all devices of all hosts.
    config.eval_batch_size = 500  # Global.
    config.num_epochs = 200.0
    config.num_train_steps = -1  # -1: derived from num_epochs.

    config.learning_rate = 0.1
    # cosine (linear warmup, then cosine to 0), multistep (x lr_decay_factor at each of
    # lr_decay_steps), piecewise (x lr_decay_factor at each of lr_decay_epochs), constant.
    config.lr_schedule = "cosine"
    config.lr_decay_factor = 0.1
    config.lr_decay_steps = (32000, 48000)
    config.lr_decay_epochs = (60.0, 120.0, 160.0)
    config.warmup_epochs = 0.0
    # The rate over those epochs: linear (from 0 up to learning_rate) or constant
    # (learning_rate x warmup_factor, then learning_rate at once: the paper's start of
    # ResNet-110, lr 0.01 for about 400 iterations).
    config.warmup_kind = "linear"
    config.warmup_factor = 0.1
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4
    # Weight decay on BatchNorm scales/biases and dense biases too (off by default).
    config.weight_decay_all = False
    config.label_smoothing = 0.0
    # Sharpness-aware minimisation (Foret et al. 2021, optax.contrib.sam): the radius of
    # the adversarial step; 0 disables. Two gradients per step: about twice the step time.
    config.sam_rho = 0.0
    # An exponential moving average of the weights and BN statistics, kept in every
    # checkpoint and evaluated beside the raw weights (eval_ema_* in the logs); 0 disables
    # (0.999-0.9999 are usual). ema_warmup: the decay is min(ema_decay, (1 + t) / (10 + t))
    # at step t, so the average soon forgets the initialisation.
    config.ema_decay = 0.0
    config.ema_warmup = True
    config.half_precision = False  # bfloat16 compute; params and BN statistics stay float32.
    # Kernels of the convolutions when training or evaluating on CPU: "eigen" (XLA's own;
    # about twice the ResNet-18 train step of the other) or "xla_default" (XLA's choice,
    # YNNPACK in jax 0.10). No effect on GPU and TPU. See resnet_jax/compile_options.py.
    config.cpu_convolutions = "eigen"

    config.seed = 0
    # On GPUs, XLA picks non-deterministic kernels (atomics in reductions, autotuned
    # convolutions) by default; True makes every step reproducible, so a resumed run ends
    # bitwise equal to an uninterrupted one, as on CPU and TPU (which are deterministic
    # anyway and ignore this). Costs GPU speed: turn it off for the last few percent.
    config.deterministic = True
    # A resume refuses a checkpoint whose learning-rate schedule differs from the config's
    # (for example a larger num_train_steps re-stretching a cosine); True continues anyway.
    config.allow_schedule_change = False
    config.log_every_steps = 100
    config.eval_every_steps = 1000  # Also evaluated at the end.
    config.checkpoint_every_steps = 1000  # Also saved at the end.
    config.keep_checkpoints = 3  # The latest N, plus the best by eval top-1.
    config.profile_num_steps = 5  # Profile this many steps early in the run; 0 disables.
    # Which checkpoint --mode=eval restores: "latest", "best" or a step number.
    config.eval_checkpoint = "latest"
    # Which weights --mode=eval evaluates: "raw" (the trained ones) or "ema" (their moving
    # average, when the run kept one: ema_decay > 0).
    config.eval_weights = "raw"
    # Flip test-time augmentation in every evaluation (training's, --mode=eval, report):
    # each prediction averages the softmax of the image and of its mirror image.
    config.eval_flip = False
    return config


def _overlay(
    config: ml_collections.ConfigDict, values: dict[str, Any], where: str, prefix: str = ""
) -> None:
    for key, value in values.items():
        if key not in config:
            if prefix + key in RETIRED_KEYS:
                continue
            raise ValueError(f"{where} has key {key!r}, which resnet_jax/defaults.py does not know")
        if isinstance(value, dict):
            _overlay(config[key], value, where, f"{prefix}{key}.")
        elif isinstance(value, list):
            config[key] = tuple(value)
        else:
            config[key] = value


def saved_config(values: dict[str, Any], where: str) -> ml_collections.ConfigDict:
    """A saved run's config (`values`, as JSON gave it) laid over today's defaults.

    The one place where an older run's config meets the current keys: keys it did not
    record keep their defaults, retired keys are skipped, lists become tuples. Code that
    reads the result can rely on every key of `get_config()`.

    Raises:
      ValueError: `values` has a key the defaults lack (`where` names its source).
    """
    config = get_config()
    _overlay(config, values, where)
    return config


def from_workdir(workdir: str | None) -> ml_collections.ConfigDict:
    """The config of the run in `workdir` (its config.json over the defaults).

    Keys the run did not record keep their defaults; retired keys are skipped.

    Raises:
      ValueError: no workdir given, no config.json there, or a key the defaults lack.
    """
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
    return saved_config(json.loads(path.read_text()), str(path))
