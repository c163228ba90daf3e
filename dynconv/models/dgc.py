"""Dynamic Group Convolution (Su et al., ECCV 2020): convolutions whose heads each read, per image, only their most
salient input channels; DenseNet (CondenseNet-style) and ResNet-18 backbones built from them.

Facts from the paper's code (hellozhuo/dgc, layers.py and models/): the operator normalises its input (BN + ReLU),
pools it once, and each head's saliency generator (Linear C -> C/r without bias, ReLU, Linear C/r -> C with bias
initialised to 1, ReLU; r halved when C < 80; Kaiming-normal weights) scores the input channels; the `inactive`
lowest-scoring channels get saliency 0 (the rule zeroes every channel scoring at most the inactive-th smallest
score, so ties zero more), each head convolves the input times its saliency vector with its own C -> C_out / H
conv, and the head outputs are interleaved (output channel j * H + h is head h's channel j). `inactive` grows with
the training progress (`inactive_channels`) and is a buffer, so evaluation uses the trained value. The training
loss adds 1e-5 times each head's mean saliency (before zeroing), summed over heads and layers.

Here the heads' generators and convs are stacked tensors (one batched product and one grouped conv for all heads);
`checkpoint_filter` maps the paper's per-head keys (`headconv_i.*`) onto them. The model's own forward is the
masked computation (every channel convolved, the dropped ones times 0); `dynconv.sparse` executes only the kept
channels (plans/dgc.py).
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.decisions import ChannelDecision, Dynamic, StaticDecision, UnitCost

from dynconv.gates import Gate
from dynconv.sparse.plans import register_plan
from dynconv.sparse.plans.dgc import DGCConvPlan
from .base import CheckpointMismatch, Decides, DynamicNetwork, ModelConfig, strip_module_prefix
from .registry import register_model

LASSO_WEIGHT = 1e-5  # the paper's weight of the mean-saliency (lasso) term


def inactive_channels(channels, gate_factor, progress):
    """Input channels a head drops at training progress p (iterations done / total): none while p <= 1/12, then
    round(C (1 - g) * 1.5 (p - 1/12)), reaching round(C (1 - g)) at p = 3/4 and kept after."""
    if progress <= 1 / 12:
        return 0
    if progress >= 3 / 4:
        return round(channels * (1 - gate_factor))
    return round(channels * (1 - gate_factor) * 1.5 * (progress - 1 / 12))


class ChannelSaliency(Gate):
    """Per image and head, a saliency score for every input channel from the pooled input, and which channels the
    head reads (`forward(pooled) -> (saliency (N, H, C) with the dropped channels at 0, kept (N, H, C) 0/1: the
    C - inactive channels a head reads, raw saliency before zeroing, idx (N, H, C - inactive): those channels)`).
    The number dropped follows the training progress (`set_schedule(progress=p)`)."""

    def __init__(self, channels, heads, squeeze_rate, gate_factor):
        super().__init__()
        hidden = channels // (squeeze_rate // 2 if channels < 80 else squeeze_rate)
        self.channels, self.heads, self.gate_factor = channels, heads, gate_factor
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, channels))
        self.fc2_weight = nn.Parameter(torch.empty(heads, channels, hidden))
        self.fc2_bias = nn.Parameter(torch.ones(heads, channels))
        for h in range(heads):  # each head's Linear weights as nn.init does them (fan-in of that Linear)
            nn.init.kaiming_normal_(self.fc1_weight[h])
            nn.init.kaiming_normal_(self.fc2_weight[h])
        self.register_buffer("inactive", torch.zeros((), dtype=torch.long))

    def set_schedule(self, progress=None, **_):
        if progress is not None and self.training:
            self.inactive.fill_(inactive_channels(self.channels, self.gate_factor, progress))

    def generator_macs(self):
        """MACs of the generators per image: both Linears of every head (and fc2's bias)."""
        return self.fc1_weight.numel() + self.fc2_weight.numel() + self.fc2_bias.numel()

    def forward(self, pooled, target=None):
        hidden = F.relu(torch.einsum("nc,hkc->nhk", pooled, self.fc1_weight))
        raw = F.relu(torch.einsum("nhk,hck->nhc", hidden, self.fc2_weight) + self.fc2_bias)
        inactive = int(self.inactive)
        if inactive <= 0:
            everything = torch.arange(self.channels, device=raw.device).expand(*raw.shape)
            return raw, torch.ones_like(raw), raw, everything
        detached = raw.detach()
        threshold = detached.kthvalue(inactive, dim=-1, keepdim=True).values
        # the paper's rule zeroes every score <= the inactive-th smallest; the C - inactive largest scores hold
        # every channel it keeps (and, on ties, some at zero): those are the channels a head reads and pays for
        idx = detached.topk(self.channels - inactive, dim=-1, sorted=False).indices
        kept = torch.zeros_like(detached).scatter_(-1, idx, 1.0)
        return raw * (detached > threshold), kept, raw, idx


class DGCConv(Dynamic, nn.Module):
    """A dynamic group convolution C_in -> C_out (kernel k, stride s) with H heads: BN + ReLU of the input, then
    every head's conv of the input times its saliency vector, outputs interleaved. `forward(x, target=None) ->
    (output, ChannelDecision)`; the decision's `kept` is (N, H, C_in) and carries the lasso term as its loss."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, heads=4, squeeze_rate=16, gate_factor=0.25):
        super().__init__()
        if in_channels % heads or out_channels % heads:
            raise ValueError(f"DGC: {heads} heads must divide the input and output channels "
                             f"({in_channels} -> {out_channels})")
        if not 0 < gate_factor <= 1:
            raise ValueError(f"DGC: the gate factor must lie in (0, 1], got {gate_factor}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.gate = ChannelSaliency(in_channels, heads, squeeze_rate, gate_factor)
        # head h's conv is rows h * C_out/H ... (h + 1) * C_out/H: the weight of one grouped conv over the heads
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        fan_out = kernel_size * kernel_size * out_channels // heads  # each head conv's fan-out, as the paper inits
        nn.init.normal_(self.weight, 0, math.sqrt(2.0 / fan_out))

    def uncounted_modules(self, full=False):
        return (self.gate,)  # its cost is in the decision

    def output_size(self, size):
        return (size + 2 * self.padding - self.kernel_size) // self.stride + 1

    def decision(self, kept, raw, x):
        """The ChannelDecision of kept (N, H, C) channels for input `x`: per kept channel k*k*C_out/H MACs at
        every output position, the generators as overhead, and the lasso term."""
        n = x.shape[0]
        per_channel = self.kernel_size ** 2 * self.out_channels // self.heads
        overhead = n * self.gate.generator_macs()
        positions = self.output_size(x.shape[-2]) * self.output_size(x.shape[-1])
        loss = LASSO_WEIGHT * raw.mean(dim=(0, 2)).sum() if torch.is_grad_enabled() else None
        return ChannelDecision(kept, UnitCost(per_channel, per_channel), positions,
                               overhead=UnitCost(overhead, overhead), loss=loss)

    def forward(self, x, target=None):
        x = self.relu(self.norm(x))
        saliency, kept, raw, _ = self.gate(spatial_mean(x), target)
        if self.kernel_size == 1:
            out = pointwise_heads(x, saliency, self.weight, self.heads, self.stride)
        else:
            out = F.conv2d(head_inputs(x, saliency), self.weight, None, self.stride, self.padding, groups=self.heads)
            out = shuffle_heads(out, self.heads)
        return out, self.decision(kept, raw, x)


class BackboneConv(nn.Module):
    """A DGC conv without DGC: its BN, ReLU and conv over every input channel, no saliency generators and no
    heads (the conv's output channels in head-major order, not interleaved; the same network up to that
    permutation, for a fresh one). The static network DGC is built on, as a reference for its speed: train_speed's
    `backbone` row (ModelConfig.backbone). (A DGC that computed only its kept channels would do fewer 1x1 MACs
    than this network; docs/dgc.md measures how little that could gain.)"""

    def __init__(self, dgc):
        super().__init__()
        self.norm, self.relu, self.weight = dgc.norm, dgc.relu, dgc.weight
        self.stride, self.padding = dgc.stride, dgc.padding

    def forward(self, x, target=None):
        out = F.conv2d(self.relu(self.norm(x)), self.weight, None, self.stride, self.padding)
        macs = x.shape[0] * self.weight.numel() * out.shape[-2] * out.shape[-1]
        return out, StaticDecision(UnitCost(macs, macs))


def backbone(model):
    """`model` (in place) with each DGC conv as its BackboneConv: the DGC network's static backbone."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DGCConv):
                setattr(module, name, BackboneConv(child))
    return model


def pointwise_heads(x, saliency, weight, heads, stride=1):
    """A 1x1 DGC conv without H copies of the map: each image's weights W times its heads' saliencies (C_out x C
    numbers, rows already interleaved j * H + h), one batched product over the channels-last rows. The same
    function as the grouped conv over the scaled copies (on CPU ~3x faster for a dydensenet86 training step), with
    its own backward (`_PointwiseHeads`)."""
    keep_layout = channels_last(x)
    if stride > 1:
        x = x[..., ::stride, ::stride]
    n, c, height, width = x.shape
    c_out = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(n, height * width, c)  # a view for a channels-last map
    # head h's output j is row j * H + h: the weight's rows reordered once (C_out x C), not the per-image product
    interleaved = weight.reshape(heads, c_out // heads, c).transpose(0, 1).contiguous()  # (C_out/H, H, C)
    out = _PointwiseHeads.apply(rows, saliency, interleaved)
    out = out.view(n, height, width, c_out).permute(0, 3, 1, 2)  # channels-last
    return out if keep_layout else out.contiguous()  # the input's memory format


class _PointwiseHeads(torch.autograd.Function):
    """rows (N, P, C), saliency (N, H, C), weight (J, H, C) -> (N, P, J * H): per image the product of its rows
    with M = weight * saliency (row j * H + h). Autograd's own backward of that product spent most of the layer's
    time in temporaries of M's size and their reductions (a dydensenet86 stage-3 layer: 5x a dense 1x1 conv);
    here the two reductions run on the one gradient of M, each as one multiply-and-sum."""

    @staticmethod
    def forward(ctx, rows, saliency, weight):
        per_image = weight[None] * saliency[:, None]  # (N, J, H, C)
        ctx.save_for_backward(rows, saliency, weight, per_image)
        return torch.bmm(rows, per_image.flatten(1, 2).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        rows, saliency, weight, per_image = ctx.saved_tensors
        n, j, h, c = per_image.shape
        # under autocast the forward's product ran in half precision while the per-image weights are float32;
        # the backward (outside autocast) works in float32, and autograd casts each gradient to its input's dtype
        grad, rows = grad.to(per_image.dtype), rows.to(per_image.dtype)
        grad_rows = torch.bmm(grad, per_image.reshape(n, j * h, c)) if ctx.needs_input_grad[0] else None
        grad_m = torch.bmm(grad.transpose(1, 2), rows).view(n, j, h, c)
        # multiply-and-sum over contiguous memory: ~10x faster here than einsum, which permutes to a batched product
        grad_saliency = (grad_m * weight).sum(1) if ctx.needs_input_grad[1] else None
        grad_weight = (grad_m * saliency[:, None]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_rows, grad_saliency, grad_weight


class _SpatialMean(torch.autograd.Function):
    """x (N, C, h, w) -> its mean per channel (N, C), whose gradient stays an expanded (N, C, 1, 1) view: autograd's
    own mean materialises the full-size gradient (a division over the map) only for it to be added to the conv's
    gradient of the same map; this way that add is the only pass (~5% of a dydensenet86 training step on CPU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx, grad):
        n, c, height, width = ctx.shape
        return (grad / (height * width))[:, :, None, None].expand(n, c, height, width)


spatial_mean = _SpatialMean.apply


def channels_last(x):
    """Whether x is a channels-last map (and not also contiguous, as a 1x1 map or a single channel is)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Both helpers keep the map's memory format: built the naive way from a channels-last map, the (N, H, C, h, w)
# product cannot be viewed as (N, H*C, h, w) and gets copied channels-first, then converted back by every conv;
# that made a dydensenet86 training step on CPU about 2x slower (~25 s against ~12 s at batch 64).
def head_inputs(x, saliency):
    """(N, H*C, h, w): every head's copy of x (N, C, h, w) times its saliency (N, H, C), head-major channels."""
    n, c, height, width = x.shape
    if channels_last(x):
        rows = x.permute(0, 2, 3, 1)[:, :, :, None, :] * saliency[:, None, None]  # (N, h, w, H, C)
        return rows.reshape(n, height, width, -1).permute(0, 3, 1, 2)
    return (x[:, None] * saliency[..., None, None]).reshape(n, -1, height, width)


def shuffle_heads(out, heads):
    """Grouped-conv output [head 0's channels, head 1's, ...] -> interleaved: channel j * H + h is head h's j."""
    n, c, height, width = out.shape
    if channels_last(out):
        rows = out.permute(0, 2, 3, 1).reshape(n, height, width, heads, c // heads).transpose(3, 4)
        return rows.reshape(n, height, width, c).permute(0, 3, 1, 2)
    return out.view(n, heads, c // heads, height, width).transpose(1, 2).reshape(n, c, height, width)


def norm_relu_conv(in_channels, out_channels, kernel_size, stride=1, groups=1):
    """The paper's static `Conv`: BN, ReLU, conv (no bias), keys norm.* / conv.*."""
    return nn.Sequential(OrderedDict(
        norm=nn.BatchNorm2d(in_channels), relu=nn.ReLU(),
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)))


class DenseLayer(nn.Module):
    """1x1 DGC to bottleneck * growth channels, 3x3 group conv to growth channels, concatenated to the input."""

    def __init__(self, in_channels, growth, bottleneck, group_3x3, **dgc):
        super().__init__()
        self.conv_1 = DGCConv(in_channels, bottleneck * growth, 1, **dgc)
        self.conv_2 = norm_relu_conv(bottleneck * growth, growth, 3, groups=group_3x3)

    def forward(self, x, target=None):
        out, decision = self.conv_1(x, target)
        return torch.cat([x, self.conv_2(out)], 1), decision


def run_layers(layers, x, target=None):
    """Runs DGC-bearing layers in order; (features, decisions of every DGC layer)."""
    decisions = []
    for layer in layers:
        x, decision = layer(x, target)
        decisions.extend(decision if isinstance(decision, list) else [decision])
    return x, decisions


class _Pass(nn.Module):
    """A layer without decisions (a transition) in a run of DGC layers."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, target=None):
        return self.module(x), []


class DyDenseNet(DynamicNetwork):
    """CondenseNet-style DenseNet of DGC dense layers: a 3x3 stem to 2 * growth[0] channels, dense stages joined by
    2x2 average pooling, BN + ReLU + global pooling + classifier. Keys as the paper's: features.init_conv,
    features.denseblock_i.denselayer_j.conv_{1,2}, bn_last, classifier."""

    def __init__(self, stages, growth, stem_stride, num_classes, bottleneck=4, group_3x3=4, **dgc):
        super().__init__()
        if len(stages) != len(growth):
            raise ValueError(f"DGC DenseNet: {len(stages)} stages but {len(growth)} growth rates")
        width = 2 * growth[0]
        self.features = nn.Sequential()
        self.features.add_module("init_conv", nn.Conv2d(3, width, 3, stem_stride, 1, bias=False))
        for i, (layers, rate) in enumerate(zip(stages, growth)):
            block = nn.Sequential()
            for j in range(layers):
                block.add_module(f"denselayer_{j + 1}", DenseLayer(width + j * rate, rate, bottleneck, group_3x3,
                                                                   **dgc))
            self.features.add_module(f"denseblock_{i + 1}", block)
            width += layers * rate
            if i + 1 < len(stages):
                self.features.add_module(f"transition_{i + 1}", _Pass(nn.AvgPool2d(2)))
        self.bn_last = nn.BatchNorm2d(width)
        self.relu_last = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        _init_static(self)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x, target=None):
        x = self.features.init_conv(x)
        blocks = [m for name, m in self.features.named_children() if name != "init_conv"]
        return run_layers([layer for m in blocks for layer in (m if isinstance(m, nn.Sequential) else [m])], x,
                          target)

    def forward_head(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.relu_last(self.bn_last(x))), 1))

    def get_classifier(self):
        return self.classifier

    def uncounted_modules(self, full=False):
        return () if full else (self.classifier,)  # as the ResNets' default count


class DGCBasicBlock(nn.Module):
    """ResNet BasicBlock whose two 3x3 convs and downsample conv are DGC (each with its own BN + ReLU in front, on
    top of the block's bn1/bn2); the downsample is DGC 1x1 + BN (the paper's downsample.0 / downsample.1.norm)."""

    def __init__(self, inplanes, planes, stride=1, **dgc):
        super().__init__()
        self.conv1 = DGCConv(inplanes, planes, 3, stride, **dgc)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = DGCConv(planes, planes, 3, 1, **dgc)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(OrderedDict(conv=DGCConv(inplanes, planes, 1, stride, **dgc),
                                                 norm=nn.BatchNorm2d(planes)))

    def forward(self, x, target=None):
        out, first = self.conv1(x, target)
        out, second = self.conv2(self.relu(self.bn1(out)), target)
        decisions = [first, second]
        identity = x
        if self.downsample is not None:
            identity, third = self.downsample.conv(x, target)
            identity = self.downsample.norm(identity)
            decisions.append(third)
        return self.relu(self.bn2(out) + identity), decisions


class DyResNet(DynamicNetwork):
    """torchvision's ResNet-18 layout (stem, layer1-4, avgpool, fc) with DGC BasicBlocks."""

    def __init__(self, layers, num_classes=1000, **dgc):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stage = [DGCBasicBlock(inplanes, planes, 1 if i == 0 else 2, **dgc)]
            stage += [DGCBasicBlock(planes, planes, **dgc) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_static(self)

    def forward_features(self, x, target=None):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return run_layers([b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage], x,
                          target)

    def forward_head(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def get_classifier(self):
        return self.fc

    def uncounted_modules(self, full=False):
        return () if full else (self.fc,)

    def foldable_conv_bn(self):
        return ((self.conv1, self.bn1),)


def _init_static(model):
    """The paper's init of the static layers: convs N(0, sqrt(2 / (k * k * C_out))) (Kaiming, fan-out), BN 1 / 0
    (DGC weights are initialised by DGCConv per head)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def paper_mmac(model, images):
    """MMac per image as the DGC paper's counter (its utils.measure_model) gives them: convs at Cin * Cout * k * k
    / groups per output position, a DGC head's conv at the gate factor of that, every ReLU and pooling at one per
    input element (max/avg pooling: kernel area per output element), Linears with their biases, each DGC layer's
    pooling, generators (with their ReLUs) and channel multiply, BN at zero. Counted on `images` (N, 3, H, W)."""
    total, handles = 0, []

    def add(module, inputs, output):
        nonlocal total
        total += _paper_count(module, inputs[0], output)

    skip = {m for d in model.modules() if isinstance(d, DGCConv) for m in d.modules() if m is not d}
    for m in model.modules():
        if m not in skip and isinstance(m, (DGCConv, nn.Conv2d, nn.Linear, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d,
                                            nn.AdaptiveAvgPool2d)):
            handles.append(m.register_forward_hook(add))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return total / images.shape[0] / 1e6


def _paper_count(module, x, output):
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(module, DGCConv):
        gate, positions = module.gate, out.shape[-2] * out.shape[-1]
        hidden = gate.fc1_weight.shape[1]
        per_head = 2 * hidden * gate.channels + hidden + 3 * gate.channels  # fc1, fc2 + bias, 2 ReLUs, multiply
        conv = module.weight.numel() * positions * gate.gate_factor  # every head at the kept fraction
        return 2 * x[0].numel() * x.shape[0] + x.shape[0] * gate.heads * per_head + x.shape[0] * conv
    if isinstance(module, nn.Conv2d):
        return module.weight.numel() * out.shape[0] * out.shape[-2] * out.shape[-1]
    if isinstance(module, nn.Linear):
        return x.shape[0] * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        return out.numel() * module.kernel_size ** 2
    return x.numel()  # ReLU, adaptive pooling


def _head_index(key):
    """'...conv_1.headconv_2.fc1.weight' -> ('...conv_1.', 2, 'fc1.weight'); None for other keys."""
    before, sep, after = key.partition("headconv_")
    if not sep:
        return None
    head, _, rest = after.partition(".")
    return before, int(head), rest


_HEAD_KEYS = {"conv.weight": "weight", "fc1.weight": "gate.fc1_weight", "fc2.weight": "gate.fc2_weight",
              "fc2.bias": "gate.fc2_bias"}


def dgc_checkpoint_filter(state_dict, model=None):
    """The paper's checkpoints (`module.` prefix, per-head `headconv_i.{conv,fc1,fc2}.*`, `_inactive_channels`,
    dyresnet18's `downsample.0` / `downsample.1.norm`) -> our layout; ours pass unchanged. With `model`, a
    checkpoint of another configuration is one line saying which option differs."""
    state_dict = strip_module_prefix(state_dict)
    if not any("headconv_" in k or k.endswith("_inactive_channels") for k in state_dict):
        return state_dict
    out, heads = {}, {}
    for key, value in state_dict.items():
        key = key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.norm.", "downsample.norm.")
        found = _head_index(key)
        if found is not None and found[2] in _HEAD_KEYS:
            prefix, head, rest = found
            heads.setdefault(prefix + _HEAD_KEYS[rest], {})[head] = value
        elif key.endswith("_inactive_channels"):
            out[key[:-len("_inactive_channels")] + "gate.inactive"] = value.reshape(()).round().long()
        else:
            out[key] = value
    for key, per_head in heads.items():
        stacked = [per_head[h] for h in sorted(per_head)]
        # the heads' convs are rows of one weight; the generators' tensors get a head dimension
        out[key] = torch.cat(stacked) if key.endswith(".weight") else torch.stack(stacked)
    if model is not None:
        _check_configuration(out, model)
    return out


def checkpoint_options(state_dict):
    """The options a state dict in our layout was built with, as far as its shapes tell: heads, and for a DenseNet
    its stages and growth rates."""
    options = {}
    heads = next((v.shape[0] for k, v in state_dict.items() if k.endswith("gate.fc1_weight")), None)
    if heads is not None:
        options["heads"] = heads
    blocks = sorted({int(k.split("denseblock_")[1].split(".")[0]) for k in state_dict if "denseblock_" in k})
    if blocks:
        layers = [{k.split(f"denseblock_{b}.")[1].split(".")[0] for k in state_dict if f"denseblock_{b}." in k}
                  for b in blocks]
        options["stages"] = tuple(len(names) for names in layers)
        options["growth"] = tuple(state_dict[f"features.denseblock_{b}.denselayer_1.conv_2.conv.weight"].shape[0]
                                  for b in blocks)
    return options


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value}"


def _check_configuration(state_dict, model):
    shown = _shown
    expected = getattr(model, "options", {})
    for name, value in checkpoint_options(state_dict).items():
        if name in expected and shown(expected[name]) != shown(value):
            raise CheckpointMismatch(f"{name} {shown(expected[name])} expected, the checkpoint has {shown(value)} "
                                     f"(--{name} {shown(value)} builds that model)")


OPTION_HELP = {
    "heads": "DGC heads per layer (each picks its own input channels; must divide the channel counts)",
    "gate_factor": "fraction of input channels each head keeps, in (0, 1]",
    "squeeze_rate": "saliency generator reduction C -> C / r (halved for layers with fewer than 80 channels)",
    "stages": "dense layers per stage (DenseNet)",
    "growth": "growth rate per stage (DenseNet)",
    "bottleneck": "1x1 DGC width in growth rates (DenseNet)",
    "group_3x3": "groups of the 3x3 conv of each dense layer (DenseNet)",
}


def _options(**defaults):
    return {name: (value, OPTION_HELP[name]) for name, value in defaults.items()}


def _dgc_config(**config):
    recipe = dict(opt="nesterov", lr=0.1, momentum=0.9, sched="cosine", weight_decay=1e-4, warmup_epochs=0)
    recipe.update(config.pop("recipe"))
    return ModelConfig(recipe=recipe, checkpoint_filter=dgc_checkpoint_filter, gates=Decides.OWN,
                       static_options={"gate_factor": 1.0}, backbone=backbone,
                       paper_count=("the DGC paper counts them", paper_mmac),
                       speed_benchmark="dynconv.benchmarks.dgc_speed", method="DGC",
                       plot_style=("DGC", "v", "tab:green"), **config)


DENSENET_OPTIONS = dict(bottleneck=4, group_3x3=4, heads=4, gate_factor=0.25, squeeze_rate=16)
# the paper's CIFAR-10 normalisation for DGC models (CIFAR-100: mean 0.5071, 0.4867, 0.4408, std 0.2675, 0.2565,
# 0.2761; the data layer here reads CIFAR-10)
CIFAR_DGC = _dgc_config(mean=(0.4914, 0.4824, 0.4467), std=(0.2471, 0.2435, 0.2616), crop_fraction=1.0,
                        recipe=dict(batchsize=64, epochs=300),
                        options=_options(stages=(14, 14, 14), growth=(8, 16, 32), **DENSENET_OPTIONS))
IMAGENET_DENSENET_DGC = _dgc_config(recipe=dict(batchsize=256, epochs=120), options=_options(
    stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), **DENSENET_OPTIONS))
IMAGENET_RESNET_DGC = _dgc_config(recipe=dict(batchsize=256, epochs=120), input_multiple=32,
                                  options=_options(heads=4, gate_factor=0.45, squeeze_rate=16))


def _build(cls, config, gate_layer, kwargs, **fixed):
    """A DGC model with the config's options (defaults) overridden by `kwargs`; `options` records them."""
    if gate_layer is not None:
        raise ValueError("DGC models choose input channels, not positions: they take no gate_layer (no --budget)")
    options = {name: kwargs.pop(name, default) for name, (default, _) in config.options.items()}
    model = cls(**fixed, **options, **kwargs)
    model.options = options
    return model


@register_model("cifar", CIFAR_DGC)
def dydensenet86(gate_layer=None, num_classes=10, **kwargs):
    """The paper's CIFAR DenseNet with DGC (86 layers: stages 14-14-14, growth 8-16-32)."""
    return _build(DyDenseNet, CIFAR_DGC, gate_layer, kwargs, stem_stride=1, num_classes=num_classes)


@register_model("imagenet", IMAGENET_DENSENET_DGC)
def dydensenet(gate_layer=None, num_classes=1000, **kwargs):
    """The paper's ImageNet DenseNet with DGC (stages 4-6-8-10-8, growth 8-16-32-64-128, stride-2 stem)."""
    return _build(DyDenseNet, IMAGENET_DENSENET_DGC, gate_layer, kwargs, stem_stride=2, num_classes=num_classes)


@register_model("imagenet", IMAGENET_RESNET_DGC)
def dyresnet18(gate_layer=None, num_classes=1000, **kwargs):
    """ResNet-18 with DGC 3x3 convs and downsamples (heads 4, gate factor 0.45)."""
    return _build(DyResNet, IMAGENET_RESNET_DGC, gate_layer, kwargs, layers=(2, 2, 2, 2), num_classes=num_classes)


register_plan(DGCConv, DGCConvPlan)  # dynconv.sparse runs each DGC layer at its kept channels only
