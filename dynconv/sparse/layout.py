"""The position-major layout of sparse execution and the pieces every plan shares: feature maps as (pixels,
channels) rows, BatchNorm folded into the preceding conv, and tap tables that turn a k x k neighbourhood into a
row gather."""
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .linear import RowLinear, onednn_applies


# Conv weights of fewer elements run through F.conv2d: their reorder is cheap, and oneDNN's prepacked conv measured
# slower on some of them (CIFAR ResNets' blocks at batch 1: 0.85 against 0.66 ms for a trained tiled ResNet-32;
# ResNet-50's 64 -> 256 1x1 conv on 56x56 maps: 0.65 against 0.28 ms). Inputs of more than one image run through
# F.conv2d too: there the reorder is shared by the images, and the prepacked conv measured slower on some layers
# (ResNet-50's 256 -> 1024 1x1 conv on 14x14 maps at batch 8: 2.7 against 1.8 ms).
PACKED_CONV_MIN_WEIGHT = 2 ** 16


@dataclass
class FoldedConv:
    """A conv with its BatchNorm folded in: the dense weight (for `conv` over whole maps) and the same as a RowLinear
    on gathered rows (for the backends' `linear`)."""

    weight: torch.Tensor  # (Cout, Cin, k, k), channels-last
    linear: RowLinear  # (k * k * Cin) -> Cout, columns ordered (dy, dx, channel) like gather_patches; None: maps only
    bias: torch.Tensor  # (Cout,)
    stride: int
    padding: int
    packed: dict = field(default_factory=dict)  # (1-image input shape, padding) -> oneDNN's weight, or None

    def conv(self, x, relu=False, padding=None):
        """The conv (and ReLU) over whole maps, with the layer's padding unless `padding` is given. For one image,
        on CPUs with oneDNN, through the weight reordered once per input shape: F.conv2d reorders it on every
        call, which at batch 1 costs as much as the conv on 14x14 and 7x7 maps (ResNet-50's stage-4 3x3 conv: 0.40
        against 0.72 ms, its 1x1 ones 0.24 against 0.94 ms on the development CPU). The layout is chosen for the
        input shape: chosen without it, or for another batch size, some 1x1 convs ran up to 15x slower. Small
        weights and batches of several images: F.conv2d (PACKED_CONV_MIN_WEIGHT)."""
        pad = self.padding if padding is None else padding
        packed = self.packed_weight(x, pad)
        if packed is not None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, [pad, pad],
                                                           [self.stride, self.stride], [1, 1], 1,
                                                           "relu" if relu else "none", [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, pad)
        return out.relu_() if relu else out

    def packed_weight(self, x, padding):
        """oneDNN's weight for `conv` on inputs shaped like x (built once per shape), or None: F.conv2d runs."""
        if x.shape[0] != 1 or self.weight.numel() < PACKED_CONV_MIN_WEIGHT:
            return None
        key = (tuple(x.shape), padding)
        if key not in self.packed:
            self.packed[key] = _onednn_conv_weight(self.weight, self.stride, padding, x.shape)
        return self.packed[key]


def _onednn_conv_weight(weight, stride, padding, input_shape):
    """A conv weight reordered for oneDNN's convolution of inputs shaped `input_shape`, or None where that path
    does not apply."""
    if not onednn_applies(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_convolution_weight(weight, [padding, padding], [stride, stride], [1, 1], 1,
                                                            list(input_shape))
    except (AttributeError, RuntimeError):  # a build without the op
        return None


def fold_conv_bn(conv, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    linear = RowLinear(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), bias)
    return FoldedConv(weight.contiguous(memory_format=torch.channels_last), linear, bias.contiguous(),
                      conv.stride[0], conv.padding[0])


def rows(x):
    """Position-major view (N*H*W, C) of a channels-last NCHW tensor."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def with_zero_row(map_rows):
    """`map_rows` followed by one zero row, where the taps outside the map point (see tap_table)."""
    return F.pad(map_rows, (0, 0, 0, 1))


@functools.lru_cache(maxsize=256)
def tap_table(n, out_h, out_w, stride, in_h, in_w, kernel_size=3, padding=1, device="cpu"):
    """(N * out_h * out_w, k * k): for every output pixel of a k x k conv (stride, padding), the input rows of
    its taps, (dy, dx) row-major; taps outside the map point to the zero row after the N * in_h * in_w map rows."""
    offsets = torch.arange(kernel_size, device=device) - padding
    iy = (torch.arange(out_h, device=device) * stride)[:, None] + offsets  # (out_h, k)
    ix = (torch.arange(out_w, device=device) * stride)[:, None] + offsets  # (out_w, k)
    inside = ((iy >= 0) & (iy < in_h))[:, None, :, None] & ((ix >= 0) & (ix < in_w))[None, :, None, :]
    within_image = iy[:, None, :, None] * in_w + ix[None, :, None, :]  # (out_h, out_w, k, k)
    image_start = torch.arange(n, device=device)[:, None, None, None, None] * (in_h * in_w)
    table = torch.where(inside, image_start + within_image, n * in_h * in_w)
    return table.reshape(n * out_h * out_w, kernel_size * kernel_size)
