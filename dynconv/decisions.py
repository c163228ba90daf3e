"""Decisions that state their own cost: what a dynamic layer chose to execute for a batch, and what that costs.

Every dynamic layer returns one record per forward pass. The sparsity objective reads `conditional()` (the MACs
the decision controls: executed, and what running everything would cost); the MAC counter reads `macs()` (what
was executed, plus the deciding overhead such as a mask unit's own conv). Layers that are not dynamic are counted
from their own output shapes (dynconv/flops.py). A record knows nothing of the method that made it:

- SpatialDecision: where a block runs (a hard 0/1 mask, optionally a dilated mask for a first conv whose output
  a following 3x3 conv reads, the soft probabilities in training);
- ChannelDecision: which input channels a layer reads, per image;
- StaticDecision: a dynamic layer whose cost does not depend on the input (e.g. weights generated per image).

Costs per unit (a position, or a channel at a position) come as `UnitCost(macs, full)`: the default count, and
the fuller count of `--full_macs` (norms, activations); see dynconv/flops.py for both definitions.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class UnitCost:
    """MACs per executed unit: `macs` in the default (paper) count, `full` in the fuller count."""

    macs: int = 0
    full: int = 0

    def get(self, full=False):
        return self.full if full else self.macs

    def __add__(self, other):
        return UnitCost(self.macs + other.macs, self.full + other.full)


ZERO = UnitCost()


class Decision:
    """Base of the records. `overhead` (UnitCost, for the whole batch): MACs spent on deciding, always run."""

    overhead = ZERO
    loss = None  # a regulariser the deciding layer adds to the training loss (weight included), or None

    def conditional(self):
        """(executed, total) MACs of the conditional layers for the batch. `executed` is a tensor that carries
        the decision's gradient where it has one (straight-through masks); `total` a number."""
        raise NotImplementedError

    def macs(self, full=False):
        """Executed MACs for the batch including the deciding overhead (a float64 tensor or a number)."""
        raise NotImplementedError


@dataclass
class SpatialDecision(Decision):
    """Where a block runs: its mask layers at `hard` positions, its dilated layers at `dilated` positions."""

    hard: torch.Tensor  # (N, 1, H, W) 0/1; straight-through gradient in training
    dilated: Optional[torch.Tensor]  # (N, 1, H', W') 0/1, no gradient; None when no layer runs at a dilated mask
    soft: Optional[torch.Tensor]  # sigmoid probabilities (training only)
    cost: UnitCost  # per position of `hard`
    dilated_cost: UnitCost = ZERO  # per position of `dilated`
    overhead: UnitCost = ZERO
    # side of the square tiles (anchored at (0, 0)) the mask is constant on: the tile grid is
    # hard[:, :, ::tile, ::tile]; 1: decided per position
    tile: int = 1
    # (hard, dilated) flat indices (int64, image-major as hard.reshape(-1)) of the masks' ones, where the unit made
    # them with the masks; None: active_positions computes them
    positions: Optional[tuple] = None

    @property
    def whole_map(self):
        """Whether one tile covers the whole mask: one decision per image."""
        return self.tile >= max(self.hard.shape[-2:])

    def active_positions(self):
        """(hard, dilated): the flat indices of the ones of `hard` and of `dilated` (None without it), int64, in
        order: the index lists the engine gathers and scatters at."""
        if self.positions is not None:
            return self.positions
        dilated = None if self.dilated is None else self.dilated.reshape(-1).nonzero().squeeze(1)
        return self.hard.reshape(-1).nonzero().squeeze(1), dilated

    def per_image(self):
        """(N,) the decision of each image, for a whole-map decision: the mask's first element, as a view."""
        return self.hard.as_strided((self.hard.shape[0],), (self.hard.stride(0),))

    def conditional(self):
        executed = self.hard.sum() * self.cost.macs
        total = self.hard.numel() * self.cost.macs
        if self.dilated is not None:
            executed = executed + self.dilated.sum() * self.dilated_cost.macs
            total += self.dilated.numel() * self.dilated_cost.macs
        return executed, total

    def macs(self, full=False):
        # float64: float32 cannot hold GMac totals exactly
        executed = self.hard.detach().sum(dtype=torch.float64) * self.cost.get(full)
        if self.dilated is not None:
            executed = executed + self.dilated.sum(dtype=torch.float64) * self.dilated_cost.get(full)
        return executed + self.overhead.get(full)


@dataclass
class ChannelDecision(Decision):
    """Which input channels a layer reads, per image: `kept` (N, C_in) 0/1, or (N, G, C_in) for layers whose G
    groups (heads) each choose; each kept channel costs `cost` per output position, over `positions` output
    positions per image."""

    kept: torch.Tensor
    cost: UnitCost  # per kept input channel and output position
    positions: int
    overhead: UnitCost = ZERO
    loss: Optional[torch.Tensor] = None  # the deciding layer's regulariser (weight included), training only

    def conditional(self):
        return self.kept.sum() * (self.cost.macs * self.positions), self.kept.numel() * self.cost.macs * self.positions

    def macs(self, full=False):
        return self.kept.detach().sum(dtype=torch.float64) * (self.cost.get(full) * self.positions) + \
            self.overhead.get(full)


@dataclass
class StaticDecision(Decision):
    """A dynamic layer that always runs all of its work: `work` for the batch, nothing conditional."""

    work: UnitCost
    overhead: UnitCost = ZERO
    loss: Optional[torch.Tensor] = None  # the layer's regulariser (weight included), training only
    detail: Optional[dict] = None  # name -> (N, ...) tensors a plot can show per image (e.g. attention vectors)

    def conditional(self):
        return torch.zeros(()), 0

    def macs(self, full=False):
        return self.work.get(full) + self.overhead.get(full)


class Dynamic:
    """Interface of modules whose decisions state the cost of some of their submodules (blocks, gates, models).
    The MAC counter does not count `uncounted_modules(full)` from their shapes: their cost is in the decisions,
    or the model's count leaves them out (e.g. a ResNet's classifier in the default count, as the paper does)."""

    def uncounted_modules(self, full=False):
        return ()

    def foldable_conv_bn(self):
        """(conv, BatchNorm) pairs outside the gated blocks where the norm directly follows the conv and nothing
        else reads the conv's output (e.g. a ResNet stem): the sparse engine folds each into one conv."""
        return ()


class RecordsDecision(Dynamic):
    """A dynamic layer called where only a tensor can be returned (e.g. a conv layer injected into a block)
    records its decision here instead; the network collects the records after its forward (`take_recorded`)."""

    recorded = None

    def record(self, decision):
        self.recorded = decision


def take_recorded(model):
    """The decisions recorded by `model`'s layers since the last call, in module order (the records cleared). The
    recording layers are looked up once per model (a deep copy, e.g. an EMA, maps the cached list to its own)."""
    recorders = model.__dict__.get("_decision_recorders")
    if recorders is None:
        recorders = [m for m in model.modules() if isinstance(m, RecordsDecision)]
        model.__dict__["_decision_recorders"] = recorders
    decisions = [m.recorded for m in recorders if m.recorded is not None]
    for m in recorders:
        m.recorded = None
    return decisions
