"""A tiny model and budget that trains and evaluates on a laptop CPU in seconds.

    python -m resnet_jax.main --config configs/smoke.py --workdir /tmp/smoke \
        --config.dataset=image_folder --config.data_dir=PATH

A ResNet-8 (the paper's CIFAR layout with n=1) at a quarter width: 4/8/16 filters,
4,887 parameters with 3 classes. On a learnable toy folder it reaches >= 90% top-1 in
150 steps (tests/test_train.py runs exactly this and measured 100%), in about 35 s on
2 CPU cores, most of it compilation.
Not meant for CIFAR accuracy: use configs/resnet18.py.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet8"
    config.model.width_multiplier = 0.25
    config.dataset = "image_folder"
    config.image_size = 16
    config.crop_padding = 2
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 1.0
    config.num_train_steps = 150
    config.learning_rate = 0.1
    config.lr_schedule = "cosine"
    config.warmup_epochs = 0.0
    config.weight_decay = 1e-4
    config.log_every_steps = 25
    config.eval_every_steps = 75
    config.checkpoint_every_steps = 75
    config.keep_checkpoints = 2
    config.profile_num_steps = 0
    return config
