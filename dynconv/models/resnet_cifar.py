"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels, optionally with gates (DynConv)."""
import math

import torch.nn as nn

from .base import TILES_HELP, ModelConfig, check_tiles
from .registry import register_model
from .resnet import BasicBlock, ResNetBase, drop_path_rates, make_stage, run_stages

# the reference's CIFAR-10 normalisation (its checkpoints expect it) and its training defaults
CIFAR_RESNET = ModelConfig(
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), crop_fraction=1.0,
    recipe=dict(opt="sgd", lr=0.1, momentum=0.9, sched="step", lr_decay=[150, 250], weight_decay=5e-4,
                batchsize=256, epochs=350),
    options={"tiles": ((1, 1, 1), TILES_HELP)})


class CifarResNet(ResNetBase):
    def __init__(self, blocks_per_stage, num_classes=10, drop_path_rate=0.0, tiles=(1, 1, 1), **layers):
        super().__init__()
        tiles = check_tiles(tiles, 3)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        rates = drop_path_rates(drop_path_rate, [blocks_per_stage] * 3)
        self.layer1 = make_stage(BasicBlock, 16, 16, blocks_per_stage, 1, rates[0], tile=tiles[0], **layers)
        self.layer2 = make_stage(BasicBlock, 16, 32, blocks_per_stage, 2, rates[1], tile=tiles[1], **layers)
        self.layer3 = make_stage(BasicBlock, 32, 64, blocks_per_stage, 2, rates[2], tile=tiles[2], **layers)
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

    def forward_features(self, x, target=None):
        return run_stages(self.stages, self.relu(self.bn1(self.conv1(x))), target)



@register_model("cifar", CIFAR_RESNET)
def resnet8(**kwargs):
    return CifarResNet(1, **kwargs)


@register_model("cifar", CIFAR_RESNET)
def resnet14(**kwargs):
    return CifarResNet(2, **kwargs)


@register_model("cifar", CIFAR_RESNET)
def resnet20(**kwargs):
    return CifarResNet(3, **kwargs)


@register_model("cifar", CIFAR_RESNET)
def resnet26(**kwargs):
    return CifarResNet(4, **kwargs)


@register_model("cifar", CIFAR_RESNET)
def resnet32(**kwargs):
    return CifarResNet(5, **kwargs)
