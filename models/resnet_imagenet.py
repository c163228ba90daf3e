"""ImageNet ResNets (torchvision's architecture and state-dict keys), optionally with DynConv blocks.

Dense models load torchvision's weights unchanged; DynConv models add `layerX.Y.masker.maskconv.{conv,fc}.*`
(the reference's checkpoint format).
"""
import torch
import torch.nn as nn

from dynconv.maskunit import MaskUnit
from .registry import register_model
from .resnet import BasicBlock, Bottleneck, make_stage, run_stages


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, mask_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stages.append(make_stage(block, inplanes, planes, blocks, 1 if i == 0 else 2, mask_layer))
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

    def forward_stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x):
        """Returns (logits, masks): one Mask per DynConv block, an empty list for the dense network."""
        x, masks = run_stages(self.stages, self.forward_stem(x))
        return self.forward_head(x), masks


def _resnet(block, layers, sparse, num_classes):
    return ResNet(block, layers, num_classes, MaskUnit if sparse else None)


@register_model("imagenet")
def resnet18(sparse=False, num_classes=1000):
    return _resnet(BasicBlock, (2, 2, 2, 2), sparse, num_classes)


@register_model("imagenet")
def resnet34(sparse=False, num_classes=1000):
    return _resnet(BasicBlock, (3, 4, 6, 3), sparse, num_classes)


@register_model("imagenet")
def resnet50(sparse=False, num_classes=1000):
    return _resnet(Bottleneck, (3, 4, 6, 3), sparse, num_classes)


@register_model("imagenet")
def resnet101(sparse=False, num_classes=1000):
    return _resnet(Bottleneck, (3, 4, 23, 3), sparse, num_classes)


@register_model("imagenet")
def resnet152(sparse=False, num_classes=1000):
    return _resnet(Bottleneck, (3, 8, 36, 3), sparse, num_classes)
