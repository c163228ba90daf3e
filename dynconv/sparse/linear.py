"""Linear layers on position rows, with the weight prepared once per engine plan.

At few rows (a block's active positions at batch 1) a matrix product costs mostly the reading and repacking of its
weight, which torch.addmm redoes on every call; and on this project's development CPU (AMD EPYC with AVX-512)
torch.addmm's BLAS runs at about 100 GMAC/s on 2 threads where oneDNN's kernels reach about 215. On CPUs with
oneDNN, RowLinear therefore also holds the weight reordered once into oneDNN's blocked layout, which the backends'
`linear` op runs through torch.ops.mkldnn._linear_pointwise (the op torch.compile's CPU backend uses for linear
layers). Measured there, 2 threads, batch 1: ResNet-50's gathered products at 30% of the positions 2.0-4.2x faster
than addmm (the 7x7 stage's 15-row products most), ConvNeXt-T's stage-4 MLPs 7 ms against 13-18 ms.
"""
import torch


# Products of fewer MACs go through addmm: oneDNN's linear costs ~13 us per call even when tiny, addmm ~4 us
# (development CPU, 2 threads: 64 x 576 x 64 MACs 22 against 27 us, 20 x 576 x 64 18 against 13 us)
ONEDNN_MIN_MACS = 2 ** 21


def onednn_pays(num_rows, weight):
    """Whether oneDNN's linear is worth its call for `num_rows` rows times a weight of K x N elements."""
    return num_rows * weight.numel() >= ONEDNN_MIN_MACS


def onednn_applies(weight):
    """Whether oneDNN's prepacked-weight ops can run this weight: float32 on a CPU, in a torch built with oneDNN."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _onednn_weight(weight):
    """The weight reordered for oneDNN's linear, or None where that path does not apply."""
    if not onednn_applies(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (AttributeError, RuntimeError):  # a build without the op
        return None


class RowLinear:
    """The weights of rows (K, in) -> rows @ weight.T + bias, from weight (out, in) and bias (out,) as a Linear
    holds them, copied (a plan's weights are frozen when it is built): `matrix` (in, out) for backends that run
    their own product, and `packed`, oneDNN's layout, where it applies (else None). The backends' `linear` op
    (dynconv/sparse/ops.py) runs them: through `packed` where the product is big enough to pay oneDNN's call."""

    def __init__(self, weight, bias):
        weight, self.bias = weight.detach(), bias.detach().contiguous()
        self.matrix = weight.t().contiguous()
        self.packed = _onednn_weight(weight)

    def runs_onednn(self, num_rows):
        """Whether the backends' `linear` runs a product of `num_rows` rows through `packed`."""
        return self.packed is not None and onednn_pays(num_rows, self.matrix)
