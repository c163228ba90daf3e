"""MAC counting with conditional execution: masked convs count only at the positions they run.

The default count is the one the DynConv paper reports ("MMac per image"): every Conv2d at
Cout * Cin / groups * kh * kw per output position (+ Cout with a bias). `full=True` adds
BatchNorm (2 per element, 1 without affine), ReLU (1 per element), Linear (in * out + out) and
pooling (1 per input element), the conventions ptflops uses.
"""
import torch
import torch.nn as nn

POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def macs_per_position(module, full=False):
    """MACs a layer spends per spatial output position (0 for layers the chosen count ignores)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = module.out_channels * module.in_channels // module.groups * kh * kw
        return macs + (module.out_channels if module.bias is not None else 0)
    if not full:
        return 0
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features * (2 if module.affine else 1)
    return 0  # ReLU is per element: the caller multiplies by channels


def _layer_macs(module, inputs, output, full):
    """MACs of one executed (unconditional) layer for the whole batch."""
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        return macs_per_position(module, full) * output.shape[0] * output.shape[-2] * output.shape[-1]
    if not full:
        return 0
    if isinstance(module, nn.ReLU):
        return output.numel()
    if isinstance(module, nn.Linear):
        rows = output.numel() // module.out_features
        return rows * (module.in_features * module.out_features + (module.out_features if module.bias is not None else 0))
    if isinstance(module, POOLS):
        return inputs[0].numel()
    return 0


def _conditional_macs_per_position(layers, full):
    """MACs per position of a block's masked layers; ReLU modules add one per channel in full mode."""
    total, channels = 0, 0
    for layer in layers:
        total += macs_per_position(layer, full)
        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        if full and isinstance(layer, nn.ReLU):
            total += channels
    return total


class MacCounter:
    """Counts the MACs of a model's forward passes while active (a context manager).

    Unconditional layers are counted from their output shapes through forward hooks; the masked layers of
    DynConv blocks (blocks with a `conditional_layers()` method and a mask unit) are counted at the active
    positions of the mask the block returned. Read `mmac_per_image` after the passes.
    """

    COUNTED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear) + POOLS

    def __init__(self, model, full=False):
        self.model = model
        self.full = full
        self.macs = 0  # python number or 0-dim tensor (kept on device: no sync per batch)
        self.images = 0
        self._handles = []

    def __enter__(self):
        from .maskunit import MaskLogits

        conditional = set()
        for logits in self.model.modules():
            if isinstance(logits, MaskLogits):  # its conv may run as a matrix product: count it here
                conditional.add(logits.conv)
                self._handles.append(logits.register_forward_hook(self._mask_logits_hook))
        for block in self.model.modules():
            if hasattr(block, "conditional_layers") and getattr(block, "masker", None) is not None:
                layers = block.conditional_layers()
                per_position = {which: _conditional_macs_per_position(mods, self.full) for which, mods in layers.items()}
                conditional.update(m for mods in layers.values() for m in mods)
                self._handles.append(block.register_forward_hook(self._block_hook(per_position)))
        for module in self.model.modules():
            if isinstance(module, self.COUNTED) and module not in conditional:
                self._handles.append(module.register_forward_hook(self._layer_hook))
        self._handles.append(self.model.register_forward_pre_hook(self._count_images))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count_images(self, module, inputs):
        self.images += inputs[0].shape[0]

    def _layer_hook(self, module, inputs, output):
        self.macs += _layer_macs(module, inputs, output, self.full)

    def _mask_logits_hook(self, module, inputs, output):
        self.macs += _layer_macs(module.conv, inputs, output, self.full)

    def _block_hook(self, per_position):
        def hook(module, inputs, output):
            mask = output[1]
            # float64: float32 cannot hold GMac totals exactly
            self.macs = (self.macs + mask.dilated.sum(dtype=torch.float64) * per_position["dilated"]
                         + mask.hard.detach().sum(dtype=torch.float64) * per_position["mask"])
        return hook

    @property
    def mmac_per_image(self):
        return float(self.macs) / max(self.images, 1) / 1e6


def count_mmac(model, images, full=False):
    """MMac per image of one forward pass of `images` (model in its current train/eval mode)."""
    with torch.no_grad(), MacCounter(model, full) as counter:
        model(images)
    return counter.mmac_per_image


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
