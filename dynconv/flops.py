"""MAC counting: layers that are not dynamic are counted from their output shapes, dynamic ones by the decisions
their forward pass returned (dynconv/decisions.py).

The default count (the DynConv paper's "MMac per image", extended to Linear layers): every Conv2d at
Cout * Cin / groups * kh * kw per output position (+ Cout with a bias) and every Linear at in * out (+ out with a
bias) per row it is applied to; norms, activations and pooling are not counted. A model leaves out of the
default count what its paper does (`Dynamic.uncounted_modules`, e.g. a ResNet's classifier). `full=True` adds
BatchNorm / LayerNorm (2 per element, 1 without affine), ReLU / GELU (1 per element) and pooling (1 per input
element), the conventions ptflops uses, and counts every Linear.
"""
import torch
import torch.nn as nn

from .decisions import Dynamic, UnitCost
from .multitarget import variant

POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
ACTIVATIONS = (nn.ReLU, nn.GELU)
COUNTED = (nn.Conv2d, nn.Linear) + NORMS + ACTIVATIONS + POOLS


def _norm_macs(module):
    """Per normalised element: a scale and a shift (2) with affine parameters, 1 without."""
    affine = getattr(module, "affine", getattr(module, "elementwise_affine", True))
    return 2 if affine else 1


def macs_per_position(module, full=False, channels=0):
    """MACs a layer spends per spatial position it runs at (0 for layers the chosen count ignores).
    `channels`: the width of the map there, for per-element layers without a width of their own (activations)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = module.out_channels * module.in_channels // module.groups * kh * kw
        return macs + (module.out_channels if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    if not full:
        return 0
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features * _norm_macs(module)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        width = module.normalized_shape[-1] if isinstance(module, nn.LayerNorm) else module.num_channels
        return width * _norm_macs(module)
    if isinstance(module, ACTIVATIONS):
        return channels
    return 0


def _width(module):
    return getattr(module, "out_channels", getattr(module, "out_features", None))


def position_cost(layers):
    """UnitCost per position of layers run in sequence there (activations count one per channel of the map)."""
    macs = full = channels = 0
    for layer in map(variant, layers):  # a per-target layer: its variants have one shape
        channels = _width(layer) or channels
        macs += macs_per_position(layer, False, channels)
        full += macs_per_position(layer, True, channels)
    return UnitCost(macs, full)


def layer_macs(module, inputs, output, full):
    """MACs of one executed (not dynamic) layer for the whole batch, from its output shape."""
    if isinstance(module, nn.Conv2d):
        return macs_per_position(module) * output.shape[0] * output.shape[-2] * output.shape[-1]
    if isinstance(module, nn.Linear):
        return macs_per_position(module) * (output.numel() // module.out_features)
    if not full:
        return 0
    if isinstance(module, NORMS):
        return output.numel() * _norm_macs(module)
    if isinstance(module, ACTIVATIONS):
        return output.numel()
    if isinstance(module, POOLS):
        return inputs[0].numel()
    return 0


class MacCounter:
    """Counts the MACs of a model's forward passes while active (a context manager).

    The model's forward returns (logits, decisions): the decisions give the MACs of the dynamic layers (and
    of deciding); every other counted layer is counted from its output shape through a forward hook, except the
    modules that `Dynamic` modules list in `uncounted_modules`. Read `mmac_per_image` after the passes.
    """

    def __init__(self, model, full=False):
        self.model = model
        self.full = full
        self.macs = 0  # python number or 0-dim float64 tensor (kept on device: no sync per batch)
        self.images = 0
        self._handles = []

    def __enter__(self):
        uncounted = set()
        for module in self.model.modules():
            if isinstance(module, Dynamic):
                uncounted.update(m for u in module.uncounted_modules(self.full) for m in u.modules())
        for module in self.model.modules():
            if isinstance(module, COUNTED) and module not in uncounted:
                self._handles.append(module.register_forward_hook(self._layer_hook))
        self._handles.append(self.model.register_forward_hook(self._model_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_hook(self, module, inputs, output):
        self.macs += layer_macs(module, inputs, output, self.full)

    def _model_hook(self, module, inputs, output):
        _, decisions = output
        self.images += inputs[0].shape[0]
        for decision in decisions:
            self.macs = self.macs + decision.macs(self.full)

    @property
    def mmac_per_image(self):
        return float(self.macs) / max(self.images, 1) / 1e6


def count_mmac(model, images, full=False, **forward_kwargs):
    """MMac per image of one forward pass of `images` (model in its current train/eval mode)."""
    with torch.no_grad(), MacCounter(model, full) as counter:
        model(images, **forward_kwargs)
    return counter.mmac_per_image


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
