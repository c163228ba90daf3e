"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels, optionally DynConv."""
import math

import torch
import torch.nn as nn

from dynconv.maskunit import MaskUnit
from .registry import register_model
from .resnet import BasicBlock, make_stage, run_stages


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage, num_classes=10, mask_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, 16, 16, blocks_per_stage, 1, mask_layer)
        self.layer2 = make_stage(BasicBlock, 16, 32, blocks_per_stage, 2, mask_layer)
        self.layer3 = make_stage(BasicBlock, 32, 64, blocks_per_stage, 2, mask_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self):
        return (self.layer1, self.layer2, self.layer3)

    def forward_stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))

    def forward_head(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x):
        """Returns (logits, masks): one Mask per DynConv block, an empty list for the dense network."""
        x, masks = run_stages(self.stages, self.forward_stem(x))
        return self.forward_head(x), masks


def _cifar_resnet(n, sparse, num_classes):
    return CifarResNet(n, num_classes, MaskUnit if sparse else None)


@register_model("cifar")
def resnet8(sparse=False, num_classes=10):
    return _cifar_resnet(1, sparse, num_classes)


@register_model("cifar")
def resnet14(sparse=False, num_classes=10):
    return _cifar_resnet(2, sparse, num_classes)


@register_model("cifar")
def resnet20(sparse=False, num_classes=10):
    return _cifar_resnet(3, sparse, num_classes)


@register_model("cifar")
def resnet26(sparse=False, num_classes=10):
    return _cifar_resnet(4, sparse, num_classes)


@register_model("cifar")
def resnet32(sparse=False, num_classes=10):
    return _cifar_resnet(5, sparse, num_classes)
