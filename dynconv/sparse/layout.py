"""The position-major layout of sparse execution and the pieces every plan shares: feature maps as (pixels,
channels) rows, BatchNorm folded into the preceding conv, and tap tables that turn a k x k neighbourhood into a
row gather."""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FoldedConv:
    """A conv with its BatchNorm folded in: dense weight (for F.conv2d) and matrix (for gathered rows)."""

    weight: torch.Tensor  # (Cout, Cin, k, k), channels-last
    matrix: torch.Tensor  # (k * k * Cin, Cout): rows ordered (dy, dx, channel) like gather_patches
    bias: torch.Tensor  # (Cout,)
    stride: int
    padding: int


def fold_conv_bn(conv, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
    return FoldedConv(weight.contiguous(memory_format=torch.channels_last), matrix, bias.contiguous(),
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
