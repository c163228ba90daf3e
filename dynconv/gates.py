"""Gates: the modules that decide, per image, what a dynamic layer executes (a mask unit, a channel-saliency
generator, one gate per budget). They are found by this type, not by name: the training schedule reaches every
gate through `set_gate_schedule`, and parameter groups tell gate parameters from the rest of the network."""
import torch.nn as nn

from .decisions import Dynamic


class Gate(Dynamic, nn.Module):
    """Base of every gate. `forward(x, target=None)` returns a Decision."""

    def set_schedule(self, **state):
        """Training-schedule state (e.g. noise=bool, temperature=float, progress=float in [0, 1]); gates take
        what concerns them and ignore the rest."""


def set_gate_schedule(model, **state):
    """Passes the schedule state to every gate of `model`."""
    for module in model.modules():
        if isinstance(module, Gate):
            module.set_schedule(**state)


def gate_state_keys(model):
    """State-dict keys (parameters and buffers) that belong to gates, e.g. for their own learning rate, or to
    let dense weights start a gated model."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Gate):
            keys.update(f"{prefix}.{k}" if prefix else k for k in module.state_dict())
    return keys
