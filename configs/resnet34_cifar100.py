"""ResNet-34 (CIFAR stem) on CIFAR-100, the ResNet-18 recipe otherwise.

    python -m resnet_jax.main --config configs/resnet34_cifar100.py --workdir runs/resnet34

Expected: at least ResNet-18's accuracy, at about 2x its time per step (ratio of
forward FLOPs, torchvision table in shared REFERENCE).
"""

from configs import resnet18


def get_config():
    config = resnet18.get_config()
    config.model.name = "resnet34"
    return config
