"""Linear layers on position rows, with the weight prepared once per engine plan.

At few rows (a block's active positions at batch 1) a matrix product costs mostly the reading and repacking of its
weight, which torch.addmm redoes on every call. On CPUs with oneDNN, RowLinear reorders the weight once into
oneDNN's blocked layout and runs torch.ops.mkldnn._linear_pointwise, the op torch.compile's CPU backend uses for
linear layers. Measured on the 2-core development CPU, batch 1, ConvNeXt-T's stage-4 MLPs at 30% of the positions:
7 ms against 13-18 ms with addmm, and no slower at every position. (Its fused GELU post-op was slower than a
separate F.gelu on full maps, so it is not used.) Elsewhere (GPUs, other dtypes, a torch without those ops):
addmm.
"""
import torch


def _onednn_weight(weight):
    """The weight reordered for oneDNN's linear, or None where that path does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (AttributeError, RuntimeError):  # a build without the op
        return None


class RowLinear:
    """rows (K, in) -> rows @ weight.T + bias; weight (out, in) and bias (out,) as a Linear holds them, copied (a
    plan's weights are frozen when it is built)."""

    def __init__(self, weight, bias):
        weight, self.bias = weight.detach(), bias.detach().contiguous()
        self.packed = _onednn_weight(weight)
        self.matrix = weight.t().contiguous() if self.packed is None else None

    def __call__(self, rows):
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return torch.addmm(self.bias, rows, self.matrix)
