"""ResNet-50 (CIFAR stem) on CIFAR-100, the ResNet-18 recipe otherwise.

    python -m resnet_jax.main --config configs/resnet50_cifar100.py --workdir runs/resnet50

Expected: at least ResNet-18's accuracy, at about 2.3x its time per step (ratio of
forward FLOPs, torchvision table in shared REFERENCE).
"""

from configs import resnet18


def get_config():
    config = resnet18.get_config()
    config.model.name = "resnet50"
    return config
