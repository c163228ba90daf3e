"""The engine plan of ConvNeXt blocks (dynconv/models/convnext.py), read by their layer names.

Per block, position-major: the gate runs as usual; the depthwise conv at the active positions (the backend's
depthwise_rows: a CUDA kernel, or on CPUs a C++ kernel, computes just those rows), with LayerNorm on those rows,
both Linears as matrix products with weights prepared once (linear.py; LayerNorm's affine folded into the first,
layer scale gamma into the second), GELU, and an add into x at the mask positions (no activation after the add).
Above `dense_above` active positions the branch runs on every row and is masked, as the model does. With one
decision per block and image (a tile covering the map), the branch runs densely on the images it is on for.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import rows
from ..linear import RowLinear
from . import BlockPlan


class ConvNeXtBlockPlan(BlockPlan):
    def __init__(self, block, ops, settings):
        super().__init__(block, ops, settings)
        if not (isinstance(block.norm, nn.LayerNorm) and isinstance(block.mlp.act, nn.GELU)):
            raise ValueError("the engine's ConvNeXt plan runs LayerNorm + GELU blocks")
        with torch.no_grad():
            conv, norm, fc1, fc2 = block.conv_dw, block.norm, block.mlp.fc1, block.mlp.fc2
            self.conv = conv
            self.taps = conv.weight.reshape(conv.out_channels, -1).t().contiguous()  # (k*k, C), tap-major
            self.conv_bias = conv.bias.detach().clone()
            self.eps = norm.eps
            # fc1(norm.weight * y + norm.bias) = (W1 diag(norm.weight)) y + (W1 norm.bias + b1)
            self.fc1 = RowLinear(fc1.weight * norm.weight, fc1.bias + fc1.weight @ norm.bias)
            self.fc2 = RowLinear(fc2.weight * block.gamma[:, None], fc2.bias * block.gamma)

    def __call__(self, x, target=None):
        x = x.contiguous(memory_format=torch.channels_last)
        decision = self.block.masker.forward(x, target)  # no hook machinery: a fixed cost of every block
        if decision.whole_map:
            return self._whole_blocks(x, decision), decision
        active = decision.hard.reshape(-1)
        idx = decision.active_positions()[0]
        out = rows(x)  # the output is x plus the branch at the mask positions, added in place
        self.executed_macs = (active.numel() if idx.numel() > self.settings.dense_above * active.numel()
                              else idx.numel()) * decision.cost.macs
        if idx.numel() > self.settings.dense_above * active.numel():
            out.addcmul_(self._mlp(self._norm(rows(self.conv(x)))), active[:, None])
        elif idx.numel() > 0:
            n, c, h, w = x.shape
            normed = self.ops.depthwise_rows(out, idx, (n, h, w), self.taps, self.conv_bias, self.eps)
            self.ops.scatter_add_(out, idx, self._mlp(normed))
        return x, decision

    def _whole_blocks(self, x, decision):
        """One decision per image: the branch runs densely on the images it is on for, added into their rows."""
        active = decision.per_image().nonzero().squeeze(1)
        n, c, h, w = x.shape
        self.executed_macs = active.numel() * h * w * decision.cost.macs
        if active.numel() == n:
            rows(x).add_(self._mlp(self._norm(rows(self.conv(x)))))
        elif active.numel() > 0:
            branch = self._mlp(self._norm(rows(self.conv(x.index_select(0, active)))))
            x.index_add_(0, active, branch.view(-1, h, w, c).permute(0, 3, 1, 2))
        return x

    def _norm(self, y):
        """LayerNorm of the depthwise conv's output rows, without its affine (folded into fc1)."""
        return F.layer_norm(y, y.shape[1:], eps=self.eps)

    def _mlp(self, y):
        """Linear, GELU, Linear (LayerNorm's affine and gamma folded) of the normalised rows."""
        y = self.ops.linear(y, self.fc1, False)
        return self.ops.linear(F.gelu(y), self.fc2, False)
