"""ImageNet ResNets (torchvision's architecture and state-dict keys), optionally with gates (DynConv).

Dense models load torchvision's weights unchanged; DynConv models add `layerX.Y.masker.maskconv.{conv,fc}.*`
(the reference's checkpoint format).
"""
import os

import torch
import torch.nn as nn

from .base import TILES_HELP, ModelConfig, WeightsUnavailable, check_tiles
from .registry import register_model
from .resnet import BasicBlock, Bottleneck, ResNetBase, drop_path_rates, make_stage, run_stages


def torchvision_weights(name):
    """torchvision's ImageNet weights for model `name`, from the torch hub cache or downloaded into it; checked
    against the hash torchvision publishes and read with weights_only (dynconv.utils.checkpoint.load_published)."""
    import torchvision

    from dynconv.utils.checkpoint import load_published

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return load_published(weights.url)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.hub's hash check of a download
        raise WeightsUnavailable(f"torchvision's ImageNet weights for {name} are not cached ({cached}) and could "
                                 f"not be downloaded ({type(e).__name__}); download {weights.url} into that folder "
                                 "(its hash is checked when it is read), or pass --pretrained PATH")


# the DynConv reference's ImageNet defaults (per process); torchvision's weights for --pretrained
IMAGENET_RESNET = ModelConfig(
    pretrained=torchvision_weights,
    recipe=dict(opt="sgd", lr=0.025, momentum=0.9, sched="step", lr_decay=[30, 60, 90], weight_decay=1e-4,
                batchsize=64, epochs=100),
    options={"tiles": ((1, 1, 1, 1), TILES_HELP)})


class ResNet(ResNetBase):
    def __init__(self, block, layers, num_classes=1000, drop_path_rate=0.0, tiles=(1, 1, 1, 1), **block_layers):
        super().__init__()
        tiles = check_tiles(tiles, 4)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        stages = []
        rates = drop_path_rates(drop_path_rate, layers)
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stages.append(make_stage(block, inplanes, planes, blocks, 1 if i == 0 else 2, rates[i],
                                     tile=tiles[i], **block_layers))
            inplanes = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self):
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward_features(self, x, target=None):
        return run_stages(self.stages, self.maxpool(self.relu(self.bn1(self.conv1(x)))), target)



@register_model("imagenet", IMAGENET_RESNET)
def resnet18(**kwargs):
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("imagenet", IMAGENET_RESNET)
def resnet34(**kwargs):
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model("imagenet", IMAGENET_RESNET)
def resnet50(**kwargs):
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model("imagenet", IMAGENET_RESNET)
def resnet101(**kwargs):
    return ResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model("imagenet", IMAGENET_RESNET)
def resnet152(**kwargs):
    return ResNet(Bottleneck, (3, 8, 36, 3), **kwargs)
