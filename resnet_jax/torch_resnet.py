"""PyTorch twins of this project's ResNets, in the layouts resnet_jax.import_torch reads.

Used by the importer's tests (weights and logits compared with ours) and by
scripts/benchmark.py (the PyTorch train step timed beside ours). Needs torch, an
optional dependency (`pip install -e ".[torch]"`).

torchvision itself is not needed: its PyPI wheel wants a CUDA build of torch, so its
ResNet is written out here from its definition: v1.5 (the bottleneck strides on its
3x3 conv), 7x7/2 stem with a 3x3/2 max-pool, `downsample.0/1`, `fc`. The tests pin the
parameter counts torchvision documents (resnet18 11,689,512; resnet50 25,557,032), which
a layout error would change. The CIFAR layout is that of the common PyTorch CIFAR
repositories: a 3x3/1 stem, `shortcut.0/1` projections (or option A, parameter-free),
`linear`.
"""

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, shortcut, shortcut_name):
        super().__init__()
        # torchvision calls the projection `downsample`, the CIFAR repositories `shortcut`.
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, shortcut)

    def merge(self, out, x):
        return F.relu(out + getattr(self, self.shortcut_name)(x))


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, inplanes, planes, stride, shortcut, shortcut_name):
        super().__init__(shortcut, shortcut_name)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.merge(self.bn2(self.conv2(out)), x)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, inplanes, planes, stride, shortcut, shortcut_name):
        super().__init__(shortcut, shortcut_name)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.merge(self.bn3(self.conv3(out)), x)


class OptionA(nn.Module):
    """The paper's parameter-free shortcut: subsample, zero-pad the new channels."""

    def __init__(self, extra):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class ResNet(nn.Module):
    """torchvision's ResNet (`layout="torchvision"`) or a PyTorch CIFAR ResNet ("cifar")."""

    def __init__(
        self,
        block,
        layers,
        num_classes,
        layout="torchvision",
        widths=(64, 128, 256, 512),
        option_a=False,
    ):
        super().__init__()
        self.layout = layout
        self.num_stages = len(layers)
        self.inplanes = widths[0]
        if layout == "torchvision":
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        shortcut_name = "downsample" if layout == "torchvision" else "shortcut"
        for stage, (blocks, width) in enumerate(zip(layers, widths, strict=False)):
            modules = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                out = width * block.expansion
                if stride == 1 and self.inplanes == out:
                    shortcut = nn.Identity()
                elif option_a:
                    shortcut = OptionA(out - self.inplanes)
                else:
                    shortcut = nn.Sequential(
                        nn.Conv2d(self.inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                    )
                modules.append(block(self.inplanes, width, stride, shortcut, shortcut_name))
                self.inplanes = out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*modules))
        head = nn.Linear(widths[-1] * block.expansion, num_classes)
        if layout == "torchvision":
            self.fc = head
        else:
            self.linear = head

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.layout == "torchvision":
            x = F.max_pool2d(x, 3, 2, 1)
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x) if self.layout == "torchvision" else self.linear(x)


def from_config(model_config, num_classes):
    """The PyTorch twin of `create_model(model_config, num_classes)` (fresh weights).

    Raises:
      ValueError: a plain net, a DenseNet or another model without a twin here.
    """
    from resnet_jax.models import TORCHVISION_DEPTHS, model_constructor

    if not model_config.name.startswith("resnet"):
        raise ValueError(f"{model_config.name}: PyTorch twins exist for the ResNets only.")
    constructor = model_constructor(model_config.name)
    num_classes = model_config.num_classes or num_classes
    scale = model_config.width_multiplier
    keywords = constructor.keywords
    widths = [max(1, round(w * scale)) for w in keywords.get("stage_widths", (64, 128, 256, 512))]
    block = Bottleneck if keywords["block_cls"].__name__ == "Bottleneck" else BasicBlock
    depth = int(model_config.name.removeprefix("resnet"))
    if depth in TORCHVISION_DEPTHS:
        layout = "torchvision" if model_config.stem == "imagenet" else "cifar"
        return ResNet(block, keywords["stage_sizes"], num_classes, layout, widths)
    return ResNet(
        block,
        keywords["stage_sizes"],
        num_classes,
        "cifar",
        widths,
        option_a=model_config.shortcut == "A",
    )
