"""DenseNet-BC (L=100, k=12) with the paper's CIFAR recipe (Huang et al. 2017, section 4.2).

    python -m resnet_jax.main --config configs/densenet_bc100.py --workdir runs/densenet_bc100
    python -m resnet_jax.main --config configs/densenet_bc100.py:cifar10 --workdir runs/dn_c10

The argument after the colon is the dataset: cifar100 (default) or cifar10.
Recipe: batch 64, 300 epochs, SGD with Nesterov momentum 0.9, weight decay 1e-4 on every
parameter, lr 0.1 divided by 10 at 50% and 75% of the epochs (150 and 225), pad-4 crop +
flip, no dropout (the paper drops out only without augmentation).
Paper test error (C10+ / C100+, augmented): 4.51% / 22.27%.
Size: 800,032 parameters on CIFAR-100 (769,162 on CIFAR-10), 0.58 GFLOP per 32x32
image forward; see them with

    python -m resnet_jax.main --config configs/densenet_bc100.py --mode=summary

Time: 2.3x ResNet-56's forward FLOPs (0.25 GFLOP) for a net of about its size, and far
more activation memory per image (scripts/compare_models.py, docs/model_comparison.md).
"""

from configs import default

DATASETS = ("cifar100", "cifar10")


def get_config(dataset: str = "cifar100"):
    if dataset not in DATASETS:
        raise ValueError(
            f"configs/densenet_bc100.py:{dataset}: the paper's recipe is for cifar100 or "
            "cifar10 (for example configs/densenet_bc100.py:cifar10)"
        )
    config = default.get_config()
    config.model.name = "densenet100"
    config.model.growth_rate = 12
    config.model.compression = 0.5
    config.dataset = dataset
    config.batch_size = 64
    config.num_epochs = 300.0
    config.num_train_steps = -1
    config.learning_rate = 0.1
    config.lr_schedule = "piecewise"
    config.lr_decay_epochs = (150.0, 225.0)
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 1e-4
    # The paper's Torch code (fb.resnet.torch's optim.sgd) decays every parameter.
    config.weight_decay_all = True
    config.label_smoothing = 0.0
    config.crop_padding = 4
    config.random_flip = True
    # 781 steps per epoch (50,000 // 64; 234,300 in all): evaluate and save every 5 epochs.
    config.eval_every_steps = 3905
    config.checkpoint_every_steps = 3905
    return config
