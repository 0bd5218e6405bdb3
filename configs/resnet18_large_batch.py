"""ResNet-18 (CIFAR stem) on CIFAR-100 at batch 1024 in bfloat16: the headline recipe sized for a chip.

    python -m resnet_jax.main --config configs/resnet18_large_batch.py --workdir runs/resnet18_b1024

Batch 128 (configs/resnet18.py) leaves a modern GPU or TPU chip mostly idle: ResNet-18 at
32x32 needs about 1.1 GFLOP per image forward, so a step of 128 images is a few
milliseconds of work for the chip, and the fixed cost of each step dominates. This variant
keeps the recipe and changes what large batches need:

- batch 1024 (8x), learning rate scaled linearly from 0.1 to 0.8, with a 5-epoch linear
  warmup before the cosine decay: the linear scaling rule with gradual warmup of Goyal et
  al. 2017 ("Accurate, Large Minibatch SGD"), which matched the batch-256 accuracy of
  ResNet-50 on ImageNet up to batch 8192 and degraded beyond it;
- bfloat16 compute (parameters, optimizer state and BatchNorm statistics stay float32);
- the same 200 epochs: 48 steps per epoch, 9,600 steps in all.

What to expect: that rule was established on ImageNet; on CIFAR-100 with ResNet-18 we know
of no public result at batch 1024 to anchor it, and 50,000 images make only 48 steps an
epoch, so the warmup and the cosine decay are coarse. Expect an accuracy near, and likely
somewhat below, the batch-128 recipe's (which aims at >= 76% top-1). On a multi-device host or a pod slice the global batch is split over every
device (1024 must divide by the device count).
"""

from configs import resnet18


def get_config():
    config = resnet18.get_config()
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.learning_rate = 0.8
    config.warmup_epochs = 5.0
    config.half_precision = True
    config.log_every_steps = 24
    config.eval_every_steps = 480  # Every 10 epochs.
    config.checkpoint_every_steps = 240  # Every 5 epochs.
    return config
