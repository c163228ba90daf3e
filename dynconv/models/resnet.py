"""ResNet blocks whose layers are constructor arguments (timm style), with an optional gate (e.g. a mask unit).

A block built with `gate_layer=None` is the plain (torchvision) block. With a gate (e.g. `dynconv.MaskUnit`)
it decides per image where its residual branch counts: output = act(identity + mask * residual). Training and
this reference path compute the residual densely and multiply by the mask (masking conv1's output with the
dilated mask would not change the result, since conv2 only feeds mask positions); `dynconv.sparse` executes only
the active positions. The layers: `conv_layer(in, out, kernel_size, stride)` (default nn.Conv2d, padding k // 2,
no bias), `norm_layer(channels)`, `act_layer()` and `gate_layer(channels, stride, dilate_stride, cost,
dilated_cost)`; `drop_path` is the stochastic-depth rate of the residual branch.
"""
import functools

import torch
import torch.nn as nn

from dynconv import fused
from dynconv.decisions import Dynamic
from dynconv.flops import position_cost
from dynconv.multitarget import per_target
from dynconv.sparse.plans import register_plan
from dynconv.sparse.plans.resnet import ResNetBlockPlan
from .base import DynamicNetwork, drop_path_layer, tiled


def default_conv(in_planes, out_planes, kernel_size, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


def conv3x3(in_planes, out_planes, stride=1, conv_layer=default_conv):
    return conv_layer(in_planes, out_planes, 3, stride)


def conv1x1(in_planes, out_planes, stride=1, conv_layer=default_conv):
    return conv_layer(in_planes, out_planes, 1, stride)


class DynBlock(Dynamic, nn.Module):
    """What BasicBlock and Bottleneck share: the gate, the drop path and the masked residual add."""

    def _init_gate(self, gate_layer, inplanes, stride, dilate_stride, drop_path):
        self.drop_path = drop_path_layer(drop_path)
        self.masker = None  # the reference's name for the gate (its checkpoint keys: layerX.Y.masker.*)
        if gate_layer is not None:
            layers = self.conditional_layers()
            self.masker = gate_layer(inplanes, stride=stride, dilate_stride=dilate_stride,
                                     cost=position_cost(layers["mask"]), dilated_cost=position_cost(layers["dilated"]))

    def conditional_layers(self):
        """Layers run at the dilated-mask positions and at the mask positions."""
        raise NotImplementedError

    def conv_norm_pairs(self):
        """The residual branch as declared structure, for whoever runs it another way (the engine's plan): its
        (conv, norm) pairs in order, an activation (act1, act2) after each but the last; then the residual add
        (identity or `downsample`) and `act_out`."""
        raise NotImplementedError

    def uncounted_modules(self, full=False):
        if self.masker is None:
            return ()
        return tuple(m for layers in self.conditional_layers().values() for m in layers)

    def residual(self, x):
        raise NotImplementedError

    def forward(self, x, target=None):
        """Returns (output, decision or None)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.drop_path(self.residual(x))
        if self.masker is None:
            return self.act_out(identity + out), None
        decision = self.masker(x, target)
        hard = decision.hard
        if torch.is_grad_enabled() and isinstance(self.act_out, nn.ReLU) and fused.usable(identity, out):
            return fused.FusedMaskedResidualReLU.apply(identity, out, hard), decision  # training, on the CPU
        return self.act_out(torch.addcmul(identity, out, hard)), decision


class BasicBlock(DynBlock):
    """conv1 (3x3, strided) at the dilated mask, conv2 (3x3) at the mask; mask at output resolution."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, gate_layer=None, conv_layer=default_conv,
                 norm_layer=nn.BatchNorm2d, act_layer=functools.partial(nn.ReLU, inplace=True), drop_path=0.0):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, conv_layer)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer()
        self.conv2 = conv3x3(planes, planes, 1, conv_layer)
        self.bn2 = norm_layer(planes)
        self.act_out = act_layer()
        self.downsample = downsample
        self.stride = stride
        self._init_gate(gate_layer, inplanes, stride, 1, drop_path)

    def conditional_layers(self):
        return {"dilated": (self.conv1, self.bn1, self.act1), "mask": (self.conv2, self.bn2)}

    def conv_norm_pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2)

    def residual(self, x):
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class Bottleneck(DynBlock):
    """conv1 (1x1) at the dilated mask (input resolution), conv2 (3x3, strided) and conv3 at the mask."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, gate_layer=None, conv_layer=default_conv,
                 norm_layer=nn.BatchNorm2d, act_layer=functools.partial(nn.ReLU, inplace=True), drop_path=0.0):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes, 1, conv_layer)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer()
        self.conv2 = conv3x3(planes, planes, stride, conv_layer)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer()
        self.conv3 = conv1x1(planes, planes * self.expansion, 1, conv_layer)
        self.bn3 = norm_layer(planes * self.expansion)
        self.act_out = act_layer()
        self.downsample = downsample
        self.stride = stride
        self._init_gate(gate_layer, inplanes, stride, stride, drop_path)

    def conditional_layers(self):
        return {"dilated": (self.conv1, self.bn1, self.act1),
                "mask": (self.conv2, self.bn2, self.act2, self.conv3, self.bn3)}

    def conv_norm_pairs(self):
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)

    def residual(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


register_plan(BasicBlock, ResNetBlockPlan)
register_plan(Bottleneck, ResNetBlockPlan)


def make_stage(block, inplanes, planes, num_blocks, stride, drop_paths=None, targets=(), tile=1, **layers):
    """A stage of `num_blocks` blocks; a 1x1 strided conv + norm downsample where the shape changes. `layers`:
    the blocks' layer arguments (gate_layer, conv_layer, norm_layer, act_layer); `drop_paths`: a rate per block;
    `tile`: the tile side its gates decide for (MaskUnit).
    `targets` (budgets): a multi-target stage, whose blocks have a gate and their norms per target (the
    budget-aware paper's model); convolutions and the downsample (with its norm) are shared."""
    drop_paths = drop_paths or [0.0] * num_blocks
    if layers.get("gate_layer") is not None:
        layers = dict(layers, gate_layer=tiled(layers["gate_layer"], tile))
    norm_layer = layers.get("norm_layer", nn.BatchNorm2d)
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                   norm_layer(planes * block.expansion))
    if targets:
        if layers.get("gate_layer") is None:
            raise ValueError("a multi-target ResNet needs a gate_layer (one gate per target)")
        layers = dict(layers, gate_layer=per_target(layers["gate_layer"], targets),
                      norm_layer=per_target(norm_layer, targets))
    blocks = [block(inplanes, planes, stride, downsample, drop_path=drop_paths[0], **layers)]
    blocks += [block(planes * block.expansion, planes, 1, None, drop_path=drop_paths[i], **layers)
               for i in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def drop_path_rates(rate, blocks_per_stage):
    """Stochastic depth rising linearly from 0 to `rate` over all blocks (timm's rule), split by stage."""
    total = sum(blocks_per_stage)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for n in blocks_per_stage:
        out.append(rates[start:start + n])
        start += n
    return out


class ResNetBase(DynamicNetwork):
    """What the CIFAR and ImageNet ResNets share: a conv1 + bn1 stem, stages of blocks, avgpool + fc head."""

    def uncounted_modules(self, full=False):
        return () if full else (self.fc,)  # the paper's count leaves the classifier out

    def forward_head(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def foldable_conv_bn(self):
        return ((self.conv1, self.bn1),)  # the stem

    def get_classifier(self):
        return self.fc


def run_stages(stages, x, target=None):
    """Runs the blocks of every stage; returns the features and the list of decisions (gated blocks only)."""
    decisions = []
    for stage in stages:
        for block in stage:
            x, decision = block(x, target)
            if decision is not None:
                decisions.append(decision)
    return x, decisions
