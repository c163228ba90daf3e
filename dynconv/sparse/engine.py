"""Sparse inference: run each gated block only where its decision says, through the block type's engine plan.

The engine computes the same function as the model in eval mode (`model(x, target)`) but skips what the gates
switched off. It knows no model or block type: it runs the model's own forward on a copy of the module tree
(sharing every parameter) in which each gated block whose type has a registered plan (dynconv/sparse/plans/) is
replaced by that plan. Stems, heads and ungated blocks run as they are, except that their plain convs run as the
plans' dense convs do (BatchNorm folded where the model declares the pair, oneDNN's weight prepacked at batch 1).
"""
import copy
import dataclasses

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..decisions import Dynamic
from ..gates import Gate
from .layout import FoldedConv
from .ops import get_ops, resolve_backend
from .plans import EngineSettings, plan_type_for


class _Planned(nn.Module):
    """A block replaced by its plan, callable like the block: (x, target) -> (output, decision)."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def forward(self, x, target=None):
        return self.plan(x, target)

    __call__ = forward  # no hook machinery: called once per block and image batch, where microseconds count


def _folded(conv, bn):
    """conv followed by its BatchNorm as one conv (torch's eval-mode fusion), channels-last like the maps."""
    return fuse_conv_bn_eval(conv, bn).to(memory_format=torch.channels_last)


class _WholeMapConv(nn.Module):
    """A conv outside the planned blocks (a stem, a downsampling layer) run as the plans run their dense convs:
    for one image on CPUs with oneDNN, with the weight reordered once per input shape (FoldedConv.conv), which
    F.conv2d redoes on every call (ConvNeXt-T's 2 x 2 downsampling convs: 1.13 against 1.56 ms for the last)."""

    def __init__(self, conv):
        super().__init__()
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        self.folded = FoldedConv(conv.weight.detach().contiguous(memory_format=torch.channels_last), None,
                                 bias.contiguous(), conv.stride[0], conv.padding[0])

    def forward(self, x):
        return self.folded.conv(x)


def _runs_as_whole_map_conv(module):
    """A plain conv (square stride and padding, no groups or dilation, zero padding) that FoldedConv runs."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and module.stride[0] == module.stride[1] and module.padding[0] == module.padding[1])


def _has_gate(module):
    return any(isinstance(m, Gate) for m in module.modules())


class SparseEngine:
    """Executes a trained dynamic model (eval mode) skipping what its gates switched off.
    `engine(x, target=None) -> (logits, decisions)`.

    backend: "auto" (CuPy kernels for CUDA tensors when available, else torch), "torch" or "cupy". The other
    keywords override the fields of plans.EngineSettings (its defaults):
    dense_above: active fraction above which a block runs densely (see plans/resnet.py);
    gather_overhead_macs: the gathered path's fixed cost per block (mask index lists, tables, gathers, scatters)
    in MACs of dense convolution; it lowers dense_above for blocks with little work. The default, 20 MMac, is
    ~0.2 ms on the 2-core development CPU, what a ResNet-50/101 block's gathered path costs beyond its matrix
    products at batch 1. It makes CIFAR ResNets at batch 1 run every block densely.
    min_gather_width: blocks whose conv2 has fewer output channels always run densely: their gathered products
    (N < 64) and patch rows cost more than oneDNN's direct convolution. The trained CIFAR ResNet-32 at batch 256:
    400 ms with its blocks gathered, 190 ms with this default, 178 ms all dense, 194 ms for the masked model.
    tile_path: whether tile-constant masks (tiles smaller than the map) run as batches of tiles with their halos
    through the dense convs (True) or through the per-position path (False); None: True on CUDA devices (cuDNN on
    stacked tiles, the way SegBlocks and BlockCopy run blocks), False on CPUs, where the gathered matrix products
    measured faster on the same tiled masks (ResNet-50, 224 px, tiles 8 4 2 1, density 0.3: 18.4 against 21.2 ms
    at batch 1, 92.6 against 116.7 ms at batch 8; docs/tiles.md). Whole blocks (a tile covering the map) always run
    as whole blocks.
    """

    def __init__(self, model, backend="auto", **settings):
        if model.training:
            raise ValueError("the sparse engine runs trained models in eval mode: call model.eval() first")
        if not _has_gate(model):
            raise ValueError("the sparse engine needs a dynamic model (gates in its blocks); this one is dense")
        self.model = model
        device = next(model.parameters()).device
        self.backend = resolve_backend(backend, device)
        self.ops = get_ops(self.backend)
        try:
            self.settings = EngineSettings(**settings)
        except TypeError:
            fields = ", ".join(f.name for f in dataclasses.fields(EngineSettings))
            raise ValueError(f"unknown engine setting among {', '.join(settings)} (settings: {fields})") from None
        if self.settings.tile_path is None:
            self.settings = dataclasses.replace(self.settings, tile_path=device.type == "cuda")
        self.plans = {}
        self.stand_ins = {}  # block -> the module that calls its plan in `network` (a benchmark may wrap .plan)
        with torch.no_grad():  # the model's own conv + BN pairs outside the blocks (e.g. a ResNet stem), folded
            pairs = model.foldable_conv_bn() if isinstance(model, Dynamic) else ()
            self.replaced = {m: r for conv, bn in pairs
                             for m, r in ((conv, _WholeMapConv(_folded(conv, bn))), (bn, nn.Identity()))}
        self.network = self._planned_copy(model, is_root=True)

    def _planned_copy(self, module, is_root=False):
        """`module` with its gated, planned blocks replaced by plans and folded layers by their replacements; a
        shallow copy wherever a child changed (the model itself is never modified)."""
        if module in self.replaced:
            return self.replaced[module]
        if not is_root and _runs_as_whole_map_conv(module):
            return _WholeMapConv(module)
        plan_type = plan_type_for(module)
        if not is_root and plan_type is not None and _has_gate(module):
            self.plans[module] = plan_type(module, self.ops, self.settings)
            self.stand_ins[module] = _Planned(self.plans[module])
            return self.stand_ins[module]
        if not is_root and isinstance(module, Gate):
            return module  # a gate outside any planned block: it runs as it is
        if not is_root and plan_type is None and _has_gate(module) and _gates_are_children(module):
            raise ValueError(f"unsupported block type {type(module).__name__} (no engine plan registered)")
        children = {name: self._planned_copy(child) for name, child in module.named_children()}
        if all(children[name] is child for name, child in module.named_children()):
            return module
        planned = copy.copy(module)
        planned._modules = dict(module._modules, **children)
        return planned

    @torch.no_grad()
    def __call__(self, x, target=None):
        return self.network(x.contiguous(memory_format=torch.channels_last), target)


def _gates_are_children(module):
    """Whether a gate is a direct child: the module is a gated block (not a container of blocks)."""
    return any(isinstance(child, Gate) for child in module.children())
