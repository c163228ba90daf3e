"""Multi-target models: one network with several operating points (budgets) chosen at run time.

A layer that differs per target (a mask unit per budget, a BatchNorm per budget with its own running statistics)
is a `PerTarget`: one variant per target, of which the selected one runs. `DynamicNetwork.forward(x, target)`
selects the target in every PerTarget of the model for the duration of its call (`selected_target`), so blocks
call their layers as usual; what is shared (convolutions, stem, classifier) is simply not wrapped.

Variants are keyed as the budget-aware paper's code writes a budget in its checkpoint keys: `str(b)` without the
dot (0.3 -> "03", 0.25 -> "025"), so a PerTarget `bn1` holds `bn1.03.*` where that code has `bn1_03.*`.
"""
import contextlib

import torch.nn as nn

from .gates import Gate


def target_key(target):
    """The key of a budget: str(float) without the dot (0.3 -> '03', 0.25 -> '025', 1 -> '10')."""
    return str(float(target)).replace(".", "")


class PerTarget(nn.ModuleDict):
    """One module per target ({target: module}); calls go to the variant of the selected target."""

    def __init__(self, variants):
        targets = tuple(float(t) for t in variants)
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"a multi-target layer needs distinct targets, got {targets}")
        super().__init__({target_key(t): module for t, module in zip(targets, variants.values())})
        self.targets = targets
        self.selected = targets[0]

    def select(self, target):
        if float(target) not in self.targets:
            shown = ", ".join(f"{t:g}" for t in self.targets)
            raise ValueError(f"no operating point {target:g}; this model has {shown}")
        self.selected = float(target)

    def variant(self, target=None):
        """The module of `target` (default: the selected one)."""
        return self[target_key(self.selected if target is None else target)]

    def forward(self, *args, **kwargs):
        return self.variant()(*args, **kwargs)

    def tie_affine(self):
        """Makes every variant use the first one's weight and bias Parameters (norms keep their own running
        statistics): the budget-aware code's choice when the model starts from pretrained weights."""
        first = self.variant(self.targets[0])
        for target in self.targets[1:]:
            other = self.variant(target)
            other.weight, other.bias = first.weight, first.bias

    def extra_repr(self):
        return f"targets={', '.join(f'{t:g}' for t in self.targets)}"


class PerTargetGate(PerTarget, Gate):
    """A gate per target: forward(x, target) asks the gate of `target` (the selected one when None), so a block
    run outside the model's forward (an engine plan) still gets the gate of the target it is given."""

    def forward(self, x, target=None):
        return self.variant(target)(x, target)

    @property
    def tile(self):
        """The tile side the gates decide for (every target's gate has the same; see MaskUnit)."""
        return getattr(self.variant(self.targets[0]), "tile", 1)


def per_target(layer, targets):
    """A layer factory (like `gate_layer` or `norm_layer`) whose layers have one variant per target; gates
    become a PerTargetGate."""
    if layer is None or not targets:
        return layer

    def make(*args, **kwargs):
        variants = {t: layer(*args, **kwargs) for t in targets}
        return (PerTargetGate if isinstance(next(iter(variants.values())), Gate) else PerTarget)(variants)

    return make


@contextlib.contextmanager
def selected_target(model, target):
    """`target` selected in every PerTarget of `model` for the duration of the block, the previous selection
    restored after it, so that no call leaves its target behind for the next (target None: the selection as it
    is, i.e. each layer's first target unless a caller selected another)."""
    if target is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, PerTarget)]
    previous = [m.selected for m in layers]
    try:
        for module in layers:
            module.select(target)
        yield
    finally:
        for module, selected in zip(layers, previous):
            module.selected = selected


def model_targets(model):
    """The targets of a multi-target model (those of its first PerTarget), or () for a single-target one."""
    return next((m.targets for m in model.modules() if isinstance(m, PerTarget)), ())


def variant(module, target=None):
    """`module` itself, or the variant of `target` when it is a PerTarget (e.g. for an engine plan's folds)."""
    return module.variant(target) if isinstance(module, PerTarget) else module


def tie_norms(model):
    """tie_affine on every per-target norm of `model` (a model started from pretrained weights)."""
    for module in model.modules():
        if isinstance(module, PerTarget) and not isinstance(module, PerTargetGate):
            module.tie_affine()


def per_target_layout(state_dict, model):
    """A checkpoint in the layout of `model`'s per-target layers (unchanged for single-target models):
    - the budget-aware code's keys, `<layer>_BB.` (norms) and `<layer>BB.` (mask units), become `<layer>.BB.`;
    - a single-target checkpoint's `<layer>.*` goes to every target: single-budget weights start a multi-target
      model. The budget-aware code's shared norms (`<layer>.*` beside its `<layer>_BB.*`, never called by its
      sparse forward) only fill what the per-budget keys leave open."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PerTarget)}
    if not layers:
        return state_dict
    out, shared = {}, {}
    for key, value in state_dict.items():
        layer, rest = _per_target_key(key, layers)
        if layer is None:
            out[key] = value
        elif rest is None:  # <layer>.<name>: one module for every target
            shared.setdefault(layer, {})[key[len(layer) + 1:]] = value
        else:
            out[f"{layer}.{rest}"] = value
    for layer, entries in shared.items():
        for target in layers[layer].targets:
            for name, value in entries.items():
                out.setdefault(f"{layer}.{target_key(target)}.{name}", value)
    return out


def _per_target_key(key, layers):
    """(layer, 'BB.<name>') for a key of one target's variant of a per-target layer, (layer, None) for a key of
    the layer without a target, (None, None) for any other key."""
    for layer, module in layers.items():
        if not key.startswith(layer):
            continue
        tail = key[len(layer):]
        for target in module.targets:
            bb = target_key(target)
            for form in (f".{bb}.", f"_{bb}.", f"{bb}."):
                if tail.startswith(form):
                    return layer, f"{bb}.{tail[len(form):]}"
        if tail.startswith("."):
            return layer, None
    return None, None


def target_state(state_dict, model, target):
    """The state dict of one target of a multi-target `model` in single-target layout (`<layer>.BB.<name>` ->
    `<layer>.<name>` for that target's variants, the other targets' dropped): e.g. the dense model with the
    norms a budget runs with."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PerTarget)}
    out = {}
    for key, value in state_dict.items():
        layer, rest = _per_target_key(key, layers)
        if layer is None or rest is None:
            out[key] = value
        elif rest.startswith(target_key(target) + "."):
            out[f"{layer}.{rest.split('.', 1)[1]}"] = value
    return out
