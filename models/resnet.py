"""ResNet blocks with an optional DynConv mask unit, and the run loop shared by every ResNet.

A block built with `mask_layer=None` is the plain (torchvision) block. With a mask layer (e.g.
`dynconv.MaskUnit`) it decides per image where its residual branch counts: output =
ReLU(identity + mask * residual). Training and this reference path compute the residual densely and
multiply by the mask (masking conv1's output with the dilated mask would not change the result, since
conv2 only feeds mask positions); `dynconv.sparse` executes only the active positions.
"""
import torch
import torch.nn as nn

from dynconv import fused
from dynconv.flops import macs_per_position
from dynconv.maskunit import Mask


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class DynBlock(nn.Module):
    """What BasicBlock and Bottleneck share: the mask unit, the cost bookkeeping, the masked residual add."""

    def _init_masking(self, mask_layer, inplanes, stride, dilate_stride):
        self.masker = mask_layer(inplanes, stride=stride, dilate_stride=dilate_stride) if mask_layer else None
        layers = self.conditional_layers()
        self.dilated_macs = sum(macs_per_position(m) for m in layers["dilated"])
        self.masked_macs = sum(macs_per_position(m) for m in layers["mask"])

    def conditional_layers(self):
        """Layers run at the dilated-mask positions and at the mask positions."""
        raise NotImplementedError

    def residual(self, x):
        raise NotImplementedError

    def forward(self, x):
        """Returns (output, Mask or None)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.residual(x)
        if self.masker is None:
            return self.act_out(identity + out), None
        hard, dilated, soft = self.masker(x)
        mask = Mask(hard, dilated, soft, self.masked_macs, self.dilated_macs)
        if torch.is_grad_enabled() and fused.usable(identity, out):  # training; counting hooks see act_out otherwise
            return fused.FusedMaskedResidualReLU.apply(identity, out, hard), mask
        return self.act_out(torch.addcmul(identity, out, hard)), mask


class BasicBlock(DynBlock):
    """conv1 (3x3, strided) at the dilated mask, conv2 (3x3) at the mask; mask at output resolution."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, mask_layer=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act_out = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_masking(mask_layer, inplanes, stride, dilate_stride=1)

    def conditional_layers(self):
        return {"dilated": (self.conv1, self.bn1, self.act1), "mask": (self.conv2, self.bn2)}

    def residual(self, x):
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class Bottleneck(DynBlock):
    """conv1 (1x1) at the dilated mask (input resolution), conv2 (3x3, strided) and conv3 at the mask."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, mask_layer=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act_out = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_masking(mask_layer, inplanes, stride, dilate_stride=stride)

    def conditional_layers(self):
        return {"dilated": (self.conv1, self.bn1, self.act1),
                "mask": (self.conv2, self.bn2, self.act2, self.conv3, self.bn3)}

    def residual(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def make_stage(block, inplanes, planes, num_blocks, stride, mask_layer):
    """A stage of `num_blocks` blocks; a 1x1 strided conv + BN downsample where the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    blocks = [block(inplanes, planes, stride, downsample, mask_layer)]
    blocks += [block(planes * block.expansion, planes, 1, None, mask_layer) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def run_stages(stages, x):
    """Runs the blocks of every stage; returns the features and the list of masks (sparse blocks only)."""
    masks = []
    for stage in stages:
        for block in stage:
            x, mask = block(x)
            if mask is not None:
                masks.append(mask)
    return x, masks
