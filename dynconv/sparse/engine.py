"""Sparse inference: run each DynConv block only at the positions its mask selects.

The engine computes the same function as the masked-dense model (`model(x)` in eval mode) but skips the
masked positions. Per block, in a position-major layout (rows = pixels, columns = channels):

- the mask unit runs as usual; the active positions of the mask and of the dilated mask become index lists;
- BasicBlock: conv1 (3x3, strided) = gather of the 3x3 neighbourhoods of the dilated positions (im2col of the
  active positions only) + one matrix product with BatchNorm folded in + ReLU; the rows go into a zero
  buffer; conv2 (3x3) the same way at the mask positions, from that buffer;
- Bottleneck: conv1 (1x1) = matrix product on the gathered rows of the dilated positions, into the zero
  buffer; conv2 (3x3, strided) and conv3 (1x1) at the mask positions;
- a 3x3 neighbourhood is a row gather through a table of tap rows per output pixel (`_tap_table`); taps
  outside the map read a zero row appended to the map's rows (no padded copies of the maps);
- the block result is added into the identity at the mask positions only, with the ReLU fused.

Positions outside the mask keep the identity. ResNet block inputs come out of a ReLU (or of max-pooling
one), so they need no ReLU; a downsampled identity (conv + BN) gets one over the whole map.

When a block's active fraction is high, gathering costs more than it saves; above a limit (`dense_above`, lower
for blocks with little work) the block runs densely (oneDNN/cuDNN convolutions with the same folded weights)
and is masked afterwards, or, when only its dilated mask is that dense, its conv1 runs everywhere.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.resnet import BasicBlock, Bottleneck
from ..maskunit import Mask, tap_logits
from .ops import get_ops, resolve_backend


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
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()
    return FoldedConv(weight.contiguous(memory_format=torch.channels_last), matrix, bias.contiguous(),
                      conv.stride[0], conv.padding[0])


def _rows(x):
    """Position-major view (N*H*W, C) of a channels-last NCHW tensor."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _with_zero_row(rows):
    """`rows` followed by one zero row, where the taps outside the map point (see _tap_table)."""
    return F.pad(rows, (0, 0, 0, 1))


@functools.lru_cache(maxsize=256)
def _tap_table(n, out_h, out_w, stride, in_h, in_w, device):
    """(N * out_h * out_w, 9): for every output pixel of a 3x3 conv (stride, padding 1), the input rows of its
    taps, (dy, dx) row-major; taps outside the map point to the zero row after the N * in_h * in_w map rows."""
    offsets = torch.arange(3, device=device) - 1
    iy = (torch.arange(out_h, device=device) * stride)[:, None] + offsets  # (out_h, 3)
    ix = (torch.arange(out_w, device=device) * stride)[:, None] + offsets  # (out_w, 3)
    inside = ((iy >= 0) & (iy < in_h))[:, None, :, None] & ((ix >= 0) & (ix < in_w))[None, :, None, :]
    within_image = iy[:, None, :, None] * in_w + ix[None, :, None, :]  # (out_h, out_w, 3, 3)
    image_start = torch.arange(n, device=device)[:, None, None, None, None] * (in_h * in_w)
    table = torch.where(inside, image_start + within_image, n * in_h * in_w)
    return table.reshape(n * out_h * out_w, 9)


class SparseEngine:
    """Executes a trained DynConv ResNet (eval mode) skipping masked positions. `engine(x) -> (logits, masks)`.

    backend: "auto" (CuPy kernels for CUDA tensors when available, else torch), "torch" or "cupy".
    dense_above: active fraction above which a block runs densely (see the module docstring);
    gather_overhead_macs: the gathered path's fixed cost per block (mask index lists, tables, gathers, scatters)
    in MACs of dense convolution; it lowers dense_above for blocks with little work (see `_dense_limit`). The
    default, 20 MMac, is ~0.2 ms on the 2-core development CPU, what a ResNet-50/101 block's gathered path costs
    beyond its matrix products at batch 1. It makes CIFAR ResNets at batch 1 run every block densely.
    min_gather_width: blocks whose conv2 has fewer output channels always run densely: their gathered products
    (N < 64) and patch rows cost more than oneDNN's direct convolution. The trained CIFAR ResNet-32 at batch 256:
    400 ms with its blocks gathered, 190 ms with this default, 178 ms all dense, 194 ms for the masked model.
    """

    def __init__(self, model, backend="auto", dense_above=0.9, gather_overhead_macs=20e6, min_gather_width=64):
        if model.training:
            raise ValueError("the sparse engine runs trained models in eval mode: call model.eval() first")
        blocks = [b for stage in getattr(model, "stages", ()) for b in stage]
        if not blocks or not all(getattr(b, "masker", None) is not None for b in blocks):
            raise ValueError("the sparse engine needs a DynConv model (mask units in every block); "
                             "this one is dense")
        unsupported = {type(b).__name__ for b in blocks if type(b) not in (BasicBlock, Bottleneck)}
        if unsupported:
            raise ValueError(f"unsupported block type {', '.join(sorted(unsupported))} "
                             "(the engine runs BasicBlock and Bottleneck)")
        self.model = model
        device = next(model.parameters()).device
        self.backend = resolve_backend(backend, device)
        self.ops = get_ops(self.backend)
        self.dense_above = dense_above
        self.gather_overhead_macs = gather_overhead_macs
        self.min_gather_width = min_gather_width
        with torch.no_grad():
            self.folded = {b: self._fold(b) for b in blocks}
            self.mask_taps = {b: b.masker.maskconv.tap_matrix() for b in blocks}
            # the ResNet stem (conv1 + bn1 + ReLU [+ max-pooling]) with its BN folded; other stems run as they are
            has_resnet_stem = isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "bn1")
            self.stem = fold_conv_bn(model.conv1, model.bn1) if has_resnet_stem else None

    @staticmethod
    def _fold(block):
        """Folded conv1, conv2 (, conv3) and, last, the downsample (or None)."""
        convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if isinstance(block, Bottleneck):
            convs.append((block.conv3, block.bn3))
        folded = [fold_conv_bn(c, bn) for c, bn in convs]
        downsample = None
        if block.downsample is not None:
            conv, bn = block.downsample
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.kernel_size == (1, 1)):
                raise ValueError("unsupported downsample (the engine folds a 1x1 conv + BatchNorm)")
            downsample = fold_conv_bn(conv, bn)
        return folded + [downsample]

    @torch.no_grad()
    def __call__(self, x):
        x = self._stem(x.contiguous(memory_format=torch.channels_last))
        masks = []
        for stage in self.model.stages:
            for block in stage:
                x, mask = self.run_block(block, x)
                masks.append(mask)
        return self.model.forward_head(x), masks

    def _stem(self, x):
        """The ResNet stem (conv1, bn1, ReLU, then max-pooling where the model has it) with BN folded in."""
        if self.stem is None:
            return self.model.forward_stem(x)
        x = F.conv2d(x, self.stem.weight, self.stem.bias, self.stem.stride, self.stem.padding).relu_()
        return self.model.maxpool(x) if hasattr(self.model, "maxpool") else x

    def run_block(self, block, x):
        mask = self._mask(block, x)
        identity = x if block.downsample is None else self._downsample(self.folded[block][-1], x)
        # the result goes into `identity` in place; outside the mask it is a ReLU output (non-negative, as
        # scatter_add_relu_ requires) or, downsampled, gets its ReLU below
        out = identity
        idx = mask.hard.reshape(-1).nonzero().squeeze(1)
        if idx.numel() > 0:
            limit = self._dense_limit(block, mask)
            if idx.numel() > limit * mask.hard.numel():
                residual = self._dense_residual(block, x)
                return torch.addcmul(identity, residual, mask.hard).relu_(), mask
            idx_dilated = mask.dilated.reshape(-1).nonzero().squeeze(1)
            if idx_dilated.numel() > limit * mask.dilated.numel():
                idx_dilated = None  # conv1 everywhere: cheaper than gathering almost every position
            if isinstance(block, BasicBlock):
                residual = self._basic_rows(block, x, idx, idx_dilated, mask.hard.shape[-2:])
            else:
                residual = self._bottleneck_rows(block, x, idx, idx_dilated, mask.hard.shape[-2:])
            self.ops["scatter_add_relu_"](_rows(out), idx, residual)
        if block.downsample is not None:
            out.relu_()  # the downsampled identity can be negative outside the mask
        return out, mask

    def _dense_limit(self, block, mask):
        """Active fraction above which the block (or its conv1) runs densely: dense_above, lowered by the gathered
        path's fixed cost relative to the block's dense work (below zero: always dense, as for small maps);
        -1 (always dense) for blocks narrower than min_gather_width."""
        if block.conv2.out_channels < self.min_gather_width:
            return -1.0
        dense_macs = mask.hard.numel() * block.masked_macs + mask.dilated.numel() * block.dilated_macs
        return self.dense_above - self.gather_overhead_macs / dense_macs

    def _mask(self, block, x):
        """The block's mask unit, its logits from the precomputed tap matrix (see `tap_logits`)."""
        matrix, constant = self.mask_taps[block]
        logits = tap_logits(x, matrix, constant, block.masker.maskconv.conv.stride[0])
        hard, dilated, _ = block.masker.decide(logits, x.shape[-2:])
        return Mask(hard, dilated, None, block.masked_macs, block.dilated_macs)

    def _downsample(self, folded, x):
        """1x1 strided conv + BN as one matrix product on the subsampled pixels (oneDNN's strided 1x1 conv
        is several times slower per MAC)."""
        s = folded.stride
        x = x[:, :, ::s, ::s].contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        out = self.ops["linear"](_rows(x), folded.matrix, folded.bias, False)
        return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def _dense_residual(self, block, x):
        """The residual branch over the whole map, with the folded weights (oneDNN / cuDNN convolutions)."""
        folded = self.folded[block][:-1]
        for i, f in enumerate(folded):
            x = F.conv2d(x, f.weight, f.bias, f.stride, f.padding)
            if i < len(folded) - 1:
                x = x.relu_()
        return x

    def _gathered_conv3x3(self, src, idx, n, out_hw, stride, in_hw, folded, relu):
        """A 3x3 conv (padding 1, BN folded) at the output positions `idx`; src: the input's rows + a zero row."""
        taps = _tap_table(n, *out_hw, stride, *in_hw, idx.device).index_select(0, idx)
        return self.ops["linear"](self.ops["gather_patches"](src, taps), folded.matrix, folded.bias, relu)

    def _buffer(self, rows, idx, num_rows):
        """A zero map of `num_rows` rows + the zero row, holding `rows` at the positions `idx`."""
        buffer = rows.new_zeros(num_rows + 1, rows.shape[1])
        return self.ops["scatter_rows_"](buffer, idx, rows)

    def _basic_rows(self, block, x, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2, _ = self.folded[block]
        if idx_dilated is None:
            y1 = F.conv2d(x, conv1.weight, conv1.bias, conv1.stride, conv1.padding).relu_()
            buffer = _with_zero_row(_rows(y1))
        else:
            y1 = self._gathered_conv3x3(_with_zero_row(_rows(x)), idx_dilated, n, out_hw, conv1.stride, (h, w),
                                        conv1, relu=True)
            buffer = self._buffer(y1, idx_dilated, n * out_hw[0] * out_hw[1])
        return self._gathered_conv3x3(buffer, idx, n, out_hw, 1, out_hw, conv2, relu=False)

    def _bottleneck_rows(self, block, x, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 and conv3 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2, conv3, _ = self.folded[block]
        if idx_dilated is None:
            buffer = _with_zero_row(self.ops["linear"](_rows(x), conv1.matrix, conv1.bias, True))
        else:
            y1 = self.ops["linear"](self.ops["gather_rows"](_rows(x), idx_dilated), conv1.matrix, conv1.bias, True)
            buffer = self._buffer(y1, idx_dilated, n * h * w)
        y2 = self._gathered_conv3x3(buffer, idx, n, out_hw, conv2.stride, (h, w), conv2, relu=True)
        return self.ops["linear"](y2, conv3.matrix, conv3.bias, False)
