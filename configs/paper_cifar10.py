"""The paper's CIFAR-10 recipe (He et al. 2015, section 4.2) for a 6n+2 ResNet.

    python -m resnet_jax.main --config configs/paper_cifar10.py:56 --workdir runs/resnet56

The argument after the colon is the depth (20, 32, 44, 56, 110, 1202; default 56).
Recipe: SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and
48k steps, 64k steps in all, shortcut option A, pad-4 crop + flip. Depth 110 and more
starts as the paper's ResNet-110 does: lr 0.01 for about 400 steps (one epoch), then 0.1
(`warmup_kind` constant; the paper returns to 0.1 once the training error is below 80%).
Paper test error: ResNet-20 8.75%, ResNet-56 6.97%, ResNet-110 6.43% (best of 5).
The paper trains on 45k images and validates on 5k; this recipe trains on all 50k.
Time: ResNet-56 is about 0.25 GFLOP per image (forward).
For the degradation experiment use the plain twin: --config.model.name=plain56.
"""

from configs import default


def get_config(depth: str = "56"):
    config = default.get_config()
    config.model.name = f"resnet{int(depth)}"
    config.model.shortcut = "A"
    config.dataset = "cifar10"
    config.batch_size = 128
    config.num_train_steps = 64000
    config.learning_rate = 0.1
    config.lr_schedule = "multistep"
    config.lr_decay_steps = (32000, 48000)
    config.lr_decay_factor = 0.1
    if int(depth) >= 110:
        config.warmup_epochs = 1.0
        config.warmup_kind = "constant"
        config.warmup_factor = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.weight_decay_all = True  # The paper decays every weight.
    config.eval_every_steps = 4000
    config.checkpoint_every_steps = 4000
    return config
