"""Mask units: decide per image at which spatial positions a residual block computes.

A mask unit looks at the block input and produces a hard (0/1) mask at the block's output resolution,
plus the *dilated* mask: the positions where the block's first conv must run so that the following
3x3 conv has all its inputs.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Mask:
    """What one DynConv block decided for a batch, and what its masked convs cost per position."""

    hard: torch.Tensor  # (N, 1, H, W) 0/1 at output resolution; straight-through gradient in training
    dilated: torch.Tensor  # (N, 1, H', W') 0/1 where the first conv runs; no gradient
    soft: Optional[torch.Tensor]  # sigmoid probabilities (training only)
    macs_per_position: int  # MACs of the convs run at `hard` positions, per position
    dilated_macs_per_position: int  # MACs of the convs run at `dilated` positions, per position

    def cost(self):
        """(conditional MACs executed, MACs if every position ran), summed over the batch; tensors."""
        executed = self.dilated.sum() * self.dilated_macs_per_position + self.hard.sum() * self.macs_per_position
        total = self.dilated.numel() * self.dilated_macs_per_position + self.hard.numel() * self.macs_per_position
        return executed, total


def sample_gumbel(like, eps=1e-8):
    """Gumbel(0, 1) noise shaped (and strided) like `like`: -log(-log(U + eps) + eps)."""
    u = torch.rand_like(like)
    return -torch.log(-torch.log(u + eps) + eps)


def dilate_mask(hard, dilate_stride=1, output_size=None):
    """Positions the block's first conv must compute so that a 3x3 conv can run at every `hard` position.

    With dilate_stride d > 1 (a strided 3x3 conv after the first conv), each mask element is first placed
    at the top-left corner of a d x d cell, then the result is dilated with a 3x3 window. `output_size`
    crops to the first conv's resolution (odd input sizes give one extra row/column otherwise).
    """
    if dilate_stride > 1:
        n, c, h, w = hard.shape
        up = hard.new_zeros(n, c, h * dilate_stride, w * dilate_stride)
        up[:, :, ::dilate_stride, ::dilate_stride] = hard
        hard = up
    if hard.numel() <= 4096:  # small maps: one op beats five
        dilated = F.max_pool2d(hard, kernel_size=3, stride=1, padding=1)
    else:  # 3x3 max separably on shifted views: 20x faster than max_pool2d (which computes indices) at batch 128
        padded = F.pad(hard, (1, 1, 1, 1))
        rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
        dilated = torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])
    if output_size is not None:
        dilated = dilated[:, :, : output_size[0], : output_size[1]]
    return dilated


class MaskLogits(nn.Module):
    """Spatial logits: a 3x3 conv to one channel plus a per-image term from the global average (C -> 1)."""

    def __init__(self, channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=3, stride=stride, padding=1, bias=True)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x):
        # inference on wide inputs: oneDNN's 1-output-channel conv is 3-4x slower than one matrix product there
        # (and faster below ~128 channels)
        if not torch.is_grad_enabled() and x.shape[1] >= 128:
            return tap_logits(x, *self.tap_matrix(), self.conv.stride[0])
        # sum, then scale the small result: mean()'s backward divides a full-size tensor
        global_term = self.fc(x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3]))[:, :, None, None]
        return self.conv(x) + global_term

    @torch.no_grad()
    def tap_matrix(self):
        """The (10, C) projection of `tap_logits` and its constant term (conv bias + fc bias). Rows 0-8: the
        conv's taps in reverse order (row 8 - (3 * dy + dx) holds tap (dy, dx), the order F.fold sums);
        row 9: the fc."""
        c = self.conv.in_channels
        taps = self.conv.weight.permute(0, 2, 3, 1).reshape(9, c).flip(0)
        return torch.cat([taps, self.fc.weight]).contiguous(), self.conv.bias + self.fc.bias


def tap_logits(x, matrix, constant, stride):
    """MaskLogits without autograd, from one matrix product and one fold (oneDNN runs a 1-output-channel
    conv several times slower than its MACs suggest).

    matrix @ x gives, at every input pixel q, the 9 contributions x[q] . w[dy, dx] of q to the 3x3 windows
    around it, and the fc's projection. F.fold (col2im) adds each pixel's contributions into its neighbours:
    the stride-1 logits; a strided conv's outputs are every stride-th of them. The fc row, averaged over each
    image, is the global term.
    """
    n, c, h, w = x.shape
    # tap-major (10, N*H*W): a channels-last x is a transposed (C, N*H*W) matrix, no copy
    taps = (matrix.to(x.dtype) @ x.permute(1, 0, 2, 3).reshape(c, -1)).reshape(10, n, h * w)
    logits = F.fold(taps[:9].transpose(0, 1), (h, w), kernel_size=3, padding=1)
    if stride > 1:
        logits = logits[..., ::stride, ::stride]
    return logits + (taps[9].mean(dim=1) + constant.to(x.dtype))[:, None, None, None]


class MaskUnit(nn.Module):
    """Gumbel-softmax mask unit (DynConv, Verelst & Tuytelaars 2020).

    Training: logits (+ Gumbel noise g1 - g2 when `gumbel_noise`), soft = sigmoid(logits / temperature),
    hard = (soft >= 0.5) with the gradient of soft (straight-through). Evaluation: hard = (logits >= 0).
    `gumbel_noise` and `temperature` are set for the whole model with `set_gumbel`.
    """

    def __init__(self, channels, stride=1, dilate_stride=1):
        super().__init__()
        self.maskconv = MaskLogits(channels, stride)
        self.dilate_stride = dilate_stride
        self.gumbel_noise = True
        self.temperature = 1.0

    def forward(self, x):
        """Returns (hard, dilated, soft); dilated is at x's resolution when dilate_stride > 1."""
        return self.decide(self.maskconv(x), x.shape[-2:])

    def decide(self, logits, input_size):
        """(hard, dilated, soft) from the logits; `input_size` is the block input's (H, W)."""
        if self.training:
            if self.gumbel_noise:
                logits = logits + (sample_gumbel(logits) - sample_gumbel(logits))
            soft = torch.sigmoid(logits / self.temperature)
            hard_value = (soft >= 0.5).to(soft.dtype)
            hard = hard_value + (soft - soft.detach())  # straight-through: exact 0/1 values, gradient of soft
        else:
            soft = None
            hard_value = (logits >= 0).to(logits.dtype)
            hard = hard_value
        with torch.no_grad():
            dilated = self.dilate(hard_value, input_size)
        return hard, dilated, soft

    def dilate(self, hard, input_size):
        """The dilated mask of a hard (0/1) mask; at the block input's resolution when dilate_stride > 1."""
        return dilate_mask(hard, self.dilate_stride, input_size if self.dilate_stride > 1 else None)


def set_gumbel(model, noise, temperature=None):
    """Switch Gumbel noise on/off (and set the temperature) in every mask unit of `model`."""
    for module in model.modules():
        if isinstance(module, MaskUnit):
            module.gumbel_noise = noise
            if temperature is not None:
                module.temperature = temperature
