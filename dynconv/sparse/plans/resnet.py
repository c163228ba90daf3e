"""The engine plan of ResNet blocks (BasicBlock, Bottleneck in dynconv/models/resnet.py), read by their layer names.

Per block, position-major (rows = pixels, columns = channels):
- the gate runs as usual; the active positions of the mask and of the dilated mask become index lists;
- BasicBlock: conv1 (3x3, strided) = gather of the 3x3 neighbourhoods of the dilated positions (im2col of the
  active positions only) + one matrix product with BatchNorm folded in + ReLU; the rows go into a zero buffer;
  conv2 (3x3) the same way at the mask positions, from that buffer;
- Bottleneck: conv1 (1x1) = matrix product on the gathered rows of the dilated positions, into the zero buffer;
  conv2 (3x3, strided) and conv3 (1x1) at the mask positions;
- a 3x3 neighbourhood is a row gather through a table of tap rows per output pixel (layout.tap_table); taps
  outside the map read a zero row appended to the map's rows (no padded copies of the maps);
- the block result is added into the identity at the mask positions only, with the ReLU fused.

Positions outside the mask keep the identity. ResNet block inputs come out of a ReLU (or of max-pooling one), so
they need no ReLU; a downsampled identity (conv + BN) gets one over the whole map.

When a block's active fraction is high, gathering costs more than it saves; above a limit (`dense_above`, lower
for blocks with little work) the block runs densely (oneDNN/cuDNN convolutions with the same folded weights) and
is masked afterwards, or, when only its dilated mask is that dense, its conv1 runs everywhere.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...multitarget import variant
from ..layout import fold_conv_bn, rows, tap_table, with_zero_row
from . import BlockPlan


def _check_layers(block):
    """The plan folds Conv2d + BatchNorm2d pairs and fuses ReLU: other injected layers have no plan here."""
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    norms = [variant(n) for n in _norms(block)]
    if not all(type(c) is nn.Conv2d for c in convs) or not all(type(n) is nn.BatchNorm2d for n in norms):
        raise ValueError(f"the engine's ResNet plan runs Conv2d + BatchNorm2d blocks; {type(block).__name__} has "
                         f"{type(convs[0]).__name__} / {type(norms[0]).__name__}")
    if not isinstance(block.act_out, nn.ReLU):
        raise ValueError(f"the engine's ResNet plan fuses a ReLU after the residual add; this block has "
                         f"{type(block.act_out).__name__}")
    if block.downsample is not None:
        conv, bn = block.downsample
        if not (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and conv.kernel_size == (1, 1)):
            raise ValueError("unsupported downsample (the engine folds a 1x1 conv + BatchNorm)")


def _norms(block):
    return [block.bn1, block.bn2] + ([block.bn3] if hasattr(block, "bn3") else [])


class ResNetBlockPlan(BlockPlan):
    """BasicBlock (conv1 3x3, conv2 3x3) and Bottleneck (conv1 1x1, conv2 3x3, conv3 1x1) with a spatial gate."""

    def __init__(self, block, ops, settings):
        super().__init__(block, ops, settings)
        _check_layers(block)
        with torch.no_grad():
            self.downsample = fold_conv_bn(*block.downsample) if block.downsample is not None else None
        self.bottleneck = hasattr(block, "conv3")
        self._folds = {}  # the norms in use (one set per target in multi-target blocks) -> folded convs
        self.folds(None)

    def folds(self, target):
        """The block's convs with the norms of `target` folded in (built once per set of norms)."""
        norms = tuple(variant(n, target) for n in _norms(self.block))
        if norms not in self._folds:
            convs = [self.block.conv1, self.block.conv2] + ([self.block.conv3] if self.bottleneck else [])
            with torch.no_grad():
                self._folds[norms] = [fold_conv_bn(c, bn) for c, bn in zip(convs, norms)]
        return self._folds[norms]

    def __call__(self, x, target=None):
        folded = self.folds(target)
        decision = self.block.masker(x, target)
        identity = x if self.downsample is None else self._downsample(x)
        # the result goes into `identity` in place; outside the mask it is a ReLU output (non-negative, as
        # scatter_add_relu_ requires) or, downsampled, gets its ReLU below
        out = identity
        idx = decision.hard.reshape(-1).nonzero().squeeze(1)
        if idx.numel() > 0:
            limit = self._dense_limit(decision)
            if idx.numel() > limit * decision.hard.numel():
                return torch.addcmul(identity, self._dense_residual(x, folded), decision.hard).relu_(), decision
            idx_dilated = decision.dilated.reshape(-1).nonzero().squeeze(1)
            if idx_dilated.numel() > limit * decision.dilated.numel():
                idx_dilated = None  # conv1 everywhere: cheaper than gathering almost every position
            rows_fn = self._bottleneck_rows if self.bottleneck else self._basic_rows
            residual = rows_fn(x, folded, idx, idx_dilated, decision.hard.shape[-2:])
            self.ops["scatter_add_relu_"](rows(out), idx, residual)
        if self.downsample is not None:
            out.relu_()  # the downsampled identity can be negative outside the mask
        return out, decision

    def _dense_limit(self, decision):
        """Active fraction above which the block (or its conv1) runs densely: dense_above, lowered by the gathered
        path's fixed cost relative to the block's dense work (below zero: always dense, as for small maps);
        -1 (always dense) for blocks narrower than min_gather_width."""
        s = self.settings
        if self.block.conv2.out_channels < s.min_gather_width:
            return -1.0
        dense_macs = decision.hard.numel() * decision.cost.macs + decision.dilated.numel() * decision.dilated_cost.macs
        return s.dense_above - s.gather_overhead_macs / dense_macs

    def _downsample(self, x):
        """1x1 strided conv + BN as one matrix product on the subsampled pixels (oneDNN's strided 1x1 conv
        is several times slower per MAC)."""
        folded = self.downsample
        s = folded.stride
        x = x[:, :, ::s, ::s].contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        out = self.ops["linear"](rows(x), folded.matrix, folded.bias, False)
        return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def _dense_residual(self, x, folded):
        """The residual branch over the whole map, with the folded weights (oneDNN / cuDNN convolutions)."""
        for i, f in enumerate(folded):
            x = F.conv2d(x, f.weight, f.bias, f.stride, f.padding)
            if i < len(folded) - 1:
                x = x.relu_()
        return x

    def _gathered_conv3x3(self, src, idx, n, out_hw, stride, in_hw, folded, relu):
        """A 3x3 conv (padding 1, BN folded) at the output positions `idx`; src: the input's rows + a zero row."""
        taps = tap_table(n, *out_hw, stride, *in_hw, 3, 1, idx.device).index_select(0, idx)
        return self.ops["linear"](self.ops["gather_patches"](src, taps), folded.matrix, folded.bias, relu)

    def _buffer(self, map_rows, idx, num_rows):
        """A zero map of `num_rows` rows + the zero row, holding `map_rows` at the positions `idx`."""
        buffer = map_rows.new_zeros(num_rows + 1, map_rows.shape[1])
        return self.ops["scatter_rows_"](buffer, idx, map_rows)

    def _basic_rows(self, x, folded, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2 = folded
        if idx_dilated is None:
            y1 = F.conv2d(x, conv1.weight, conv1.bias, conv1.stride, conv1.padding).relu_()
            buffer = with_zero_row(rows(y1))
        else:
            y1 = self._gathered_conv3x3(with_zero_row(rows(x)), idx_dilated, n, out_hw, conv1.stride, (h, w),
                                        conv1, relu=True)
            buffer = self._buffer(y1, idx_dilated, n * out_hw[0] * out_hw[1])
        return self._gathered_conv3x3(buffer, idx, n, out_hw, 1, out_hw, conv2, relu=False)

    def _bottleneck_rows(self, x, folded, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 and conv3 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2, conv3 = folded
        if idx_dilated is None:
            buffer = with_zero_row(self.ops["linear"](rows(x), conv1.matrix, conv1.bias, True))
        else:
            y1 = self.ops["linear"](self.ops["gather_rows"](rows(x), idx_dilated), conv1.matrix, conv1.bias, True)
            buffer = self._buffer(y1, idx_dilated, n * h * w)
        y2 = self._gathered_conv3x3(buffer, idx, n, out_hw, conv2.stride, (h, w), conv2, relu=True)
        return self.ops["linear"](y2, conv3.matrix, conv3.bias, False)
