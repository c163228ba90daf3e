"""The engine plan of ConvNeXt blocks (models/convnext.py), read by their layer names.

Per block, position-major: the gate runs as usual; at the active positions only, the 7x7 neighbourhoods of the
dense block input are gathered (a row gather through the tap table, zero row outside the map) for the depthwise
conv, then LayerNorm on those rows, both Linears as matrix products (layer scale gamma folded into the second),
GELU, and the result is added into x at the mask positions (no activation after the add). Above `dense_above`
active positions the branch runs densely and is masked, as the model does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import rows, tap_table, with_zero_row
from . import BlockPlan


class ConvNeXtBlockPlan(BlockPlan):
    def __init__(self, block, ops, settings):
        super().__init__(block, ops, settings)
        if not (isinstance(block.norm, nn.LayerNorm) and isinstance(block.mlp.act, nn.GELU)):
            raise ValueError("the engine's ConvNeXt plan runs LayerNorm + GELU blocks")
        with torch.no_grad():
            conv = block.conv_dw
            self.kernel = conv.kernel_size[0]
            self.taps = conv.weight.reshape(conv.out_channels, -1).t().contiguous()  # (k*k, C), tap-major
            self.conv_bias = conv.bias.clone()
            self.fc1 = block.mlp.fc1.weight.t().contiguous()
            self.fc1_bias = block.mlp.fc1.bias.clone()
            self.fc2 = (block.mlp.fc2.weight.t() * block.gamma).contiguous()  # gamma folded in
            self.fc2_bias = block.mlp.fc2.bias * block.gamma

    def __call__(self, x, target=None):
        x = x.contiguous(memory_format=torch.channels_last)
        decision = self.block.masker(x, target)
        idx = decision.hard.reshape(-1).nonzero().squeeze(1)
        if idx.numel() > self.settings.dense_above * decision.hard.numel():
            return torch.addcmul(x, self.block.branch(x), decision.hard), decision
        if idx.numel() > 0:
            self.ops["scatter_add_"](rows(x), idx, self._branch_rows(x, idx))
        return x, decision

    def _branch_rows(self, x, idx):
        """The branch at the active positions `idx`, as (len(idx), C) rows."""
        n, c, h, w = x.shape
        k = self.kernel
        taps = tap_table(n, h, w, 1, h, w, k, k // 2, idx.device).index_select(0, idx)
        patches = self.ops["gather_patches"](with_zero_row(rows(x)), taps).view(-1, k * k, c)
        y = torch.einsum("ktc,tc->kc", patches, self.taps) + self.conv_bias
        y = F.layer_norm(y, (c,), self.block.norm.weight, self.block.norm.bias, self.block.norm.eps)
        y = F.gelu(torch.addmm(self.fc1_bias, y, self.fc1))
        return torch.addmm(self.fc2_bias, y, self.fc2)
