"""Sparsity criterion: keeps the executed conditional MACs near the budget (DynConv, section 3.3)."""
import math

import torch
import torch.nn.functional as F


def budget_bounds(budget, epoch, num_epochs):
    """Per-block (lower, upper) cost-fraction bounds; they open from [b, b] to [0, 1] over the first 33% epochs."""
    progress = min(max(epoch / (0.33 * num_epochs), 0.0), 1.0)
    annealing = math.cos(progress * math.pi / 2) ** 2
    upper = 1 - annealing * (1 - budget)
    lower = annealing * budget
    return lower, upper


class SparsityCriterion:
    """weight * (network term + mean block term), from the decisions one forward pass returned: each decision
    with conditional MACs is a block; its cost fraction is executed / total conditional MACs."""

    def __init__(self, budget, num_epochs, weight=10.0):
        self.budget = budget
        self.num_epochs = num_epochs
        self.weight = weight

    def __call__(self, decisions, epoch, budget=None):
        """Returns (loss, cost fraction of the network, per-block cost fractions); all tensors. `budget`: this
        step's budget in place of the criterion's own (multi-target models train one budget per step)."""
        budget = self.budget if budget is None else budget
        lower, upper = budget_bounds(budget, epoch, self.num_epochs)
        costs = [c for c in (d.conditional() for d in decisions) if c[1] > 0]
        executed, totals = zip(*costs)
        executed = torch.stack(executed)
        totals = torch.tensor(totals, dtype=executed.dtype, device=executed.device)
        block_fractions = executed / totals
        block_term = (F.relu(block_fractions - upper) ** 2 + F.relu(lower - block_fractions) ** 2).mean()
        network_fraction = executed.sum() / totals.sum()
        network_term = (network_fraction - budget) ** 2
        loss = self.weight * (network_term + block_term)
        return loss, network_fraction.detach(), block_fractions.detach()
