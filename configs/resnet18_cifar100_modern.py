"""ResNet-18 (CIFAR stem) on CIFAR-100 with a modern recipe: SAM, Cutout, EMA.

    python -m resnet_jax.main --config configs/resnet18_cifar100_modern.py \
        --workdir runs/resnet18_modern

Model: 11,220,132 parameters, as configs/resnet18.py.
Recipe: the one nblt/F-SAM publishes for ResNet-18 on CIFAR-100 with SAM: 200 epochs of
SGD (momentum 0.9), batch 128, lr 0.05 with a cosine decay, weight decay 1e-3, SAM with
rho 0.2, pad-4 crop + flip + Cutout, where its log reports 80.78% top-1 at the final
epoch (docs: ../shared/REFERENCE.md's public results). Cutout is 16 pixels, the Cutout
paper's CIFAR size. Added here, without changing the training: an EMA of the weights
(decay 0.9999 with warm-up), evaluated beside the raw weights (eval_ema_top1), and flip
test-time augmentation for a separate evaluation afterwards:

    python -m resnet_jax.main --config configs/from_workdir.py:runs/resnet18_modern \
        --workdir runs/resnet18_modern --mode=eval --config.eval_flip=True

What we expect: >= 80% top-1 from the final checkpoint (raw weights), from the F-SAM
figure above; the public logs of the other modern recipes for this net are CutMix 78.17%
and mixup 79.12% (openmixup, 800 epochs).
Time: SAM takes two gradients per step, so twice configs/resnet18.py's 78,000 steps of
compute: hours on one accelerator chip, far out of reach of a CPU.
"""

from configs import resnet18


def get_config():
    # configs/resnet18.py's model, data, epochs, cosine schedule and logging; F-SAM's
    # optimizer settings and regularizers instead of its own.
    config = resnet18.get_config()
    config.learning_rate = 0.05
    config.warmup_epochs = 0.0
    config.nesterov = False
    config.label_smoothing = 0.0
    config.weight_decay = 1e-3
    config.sam_rho = 0.2
    config.cutout_size = 16
    config.ema_decay = 0.9999
    return config
