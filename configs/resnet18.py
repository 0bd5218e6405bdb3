"""ResNet-18 (CIFAR stem) on CIFAR-100: the headline recipe.

    python -m resnet_jax.main --config configs/resnet18.py --workdir runs/resnet18

Model: 11,220,132 parameters, about 1.11 GFLOP per 32x32 image (forward).
Recipe: 200 epochs of SGD (momentum 0.9, Nesterov), batch 128, lr 0.1 with a one-epoch
linear warmup then cosine decay, weight decay 5e-4 (not on BN and biases), label
smoothing 0.1, pad-4 crop + flip. The comparable public result is 75.61% top-1
(weiaicunzai/pytorch-cifar100, step schedule, best epoch picked on the test set); this
recipe aims at >= 76% top-1 from the final checkpoint.
Time: 78,000 steps of 128 images (390 an epoch), 10 million in all. A 2-core Xeon VM ran the step and the
loop at 43 to 50 images/s (docs/benchmarks.md): about 2.5 days. One H200 ran the float32
step at 44,311 images/s at batch 1024 (docs/benchmarks.md): about 4 minutes of steps; batch
128 itself was not measured there and is slower per image.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet18"
    config.model.stem = "cifar"
    config.dataset = "cifar100"
    config.batch_size = 128
    config.num_epochs = 200.0
    config.learning_rate = 0.1
    config.lr_schedule = "cosine"
    config.warmup_epochs = 1.0
    config.nesterov = True
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = 3910  # Every 10 epochs.
    config.checkpoint_every_steps = 1955  # Every 5 epochs.
    return config
