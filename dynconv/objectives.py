"""The training loss as a sum of named terms. Each term reads what one training step produced (`StepOutput`) and
returns its value (weight included), optionally with metrics to log; `Loss` adds them up and reports every
term by name, so the training loop logs them without knowing which exist.

Terms: the task loss (cross-entropy with optional label smoothing, or soft targets after mixup), the sparsity
criterion (DynConv), distillation from a teacher, and `DecisionLosses` for method regularisers that decisions
carry themselves.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .loss import SparsityCriterion


@dataclass
class StepOutput:
    """One training step's forward pass and its inputs."""

    images: torch.Tensor
    logits: torch.Tensor
    decisions: list
    labels: torch.Tensor  # class indices, or (N, classes) soft targets after mixup
    epoch: float  # epochs done, fractional within the epoch
    target: Any = None  # what the step ran (e.g. a budget), for multi-target terms


class Objective:
    """A named loss term: `term(step) -> value` or `(value, metrics)`; metrics are detached numbers/tensors."""

    name = "objective"

    def __call__(self, step):
        raise NotImplementedError


class TaskLoss(Objective):
    """Cross-entropy on class indices (optional label smoothing) or soft-target cross-entropy (mixup/cutmix)."""

    name = "task"

    def __init__(self, smoothing=0.0):
        self.smoothing = smoothing

    def __call__(self, step):
        if step.labels.dim() == 2:  # soft targets: mixup/cutmix already applied the smoothing
            from timm.loss import SoftTargetCrossEntropy  # on use: timm takes seconds to import

            return SoftTargetCrossEntropy()(step.logits, step.labels)
        return F.cross_entropy(step.logits, step.labels, label_smoothing=self.smoothing)


class Sparsity(Objective):
    """DynConv's sparsity criterion on the step's decisions, with the network and per-block cost fractions.
    budget None: the budget the step trained (`step.target`, multi-target models)."""

    name = "sparsity"

    def __init__(self, budget, num_epochs, weight=10.0):
        self.criterion = SparsityCriterion(budget, num_epochs, weight)

    def __call__(self, step):
        budget = step.target if self.criterion.budget is None else None
        loss, cost, block_costs = self.criterion(step.decisions, int(step.epoch), budget)
        return loss, {"cost": cost, "block_cost": block_costs}


class Distillation(Objective):
    """weight * KL(softmax(teacher / T) || softmax(student / T)) * T^2, batch mean (Hinton et al.); the teacher
    runs in eval mode without gradients on the same (possibly mixed) images."""

    name = "kd"

    def __init__(self, teacher, temperature=20.0, weight=0.01):
        self.teacher = teacher.eval()
        self.temperature, self.weight = temperature, weight

    def __call__(self, step):
        with torch.no_grad():
            teacher_logits = self.teacher(step.images)
        if isinstance(teacher_logits, tuple):  # one of our models: (logits, decisions)
            teacher_logits = teacher_logits[0]
        t = self.temperature
        kl = F.kl_div(F.log_softmax(step.logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True)
        return self.weight * kl * t * t


class DecisionLosses(Objective):
    """Regularisers that decisions carry (`decision.loss`, weighted by the layer that made it), summed; None
    (no term) when no decision carries one, so models without regularisers log nothing for it."""

    name = "regulariser"

    def __call__(self, step):
        losses = [d.loss for d in step.decisions if d.loss is not None]
        return torch.stack(losses).sum() if losses else None


class BudgetAwareness:
    """The budget-aware paper's loss weight per budget: `awareness(step)` is w_b of the step's budget b.

    From each budget's validation Prec@1 a_b against its target t_b (`update`, after every epoch): r_b =
    (t_b - a_b)^2 ('l2'), max(0, 1 - a_b / t_b) ('l1'; the paper's code has no clamp, so a budget above its
    target gets a negative weight there) or 1 ('none'); w_b = N r_b / sum(r), every w_b = 1 when sum(r) = 0
    and before the first update."""

    METRICS = ("l1", "l2", "none")

    def __init__(self, budgets, metric="none", targets=None):
        if metric not in self.METRICS:
            raise ValueError(f"unknown awareness metric '{metric}' (choices: {', '.join(self.METRICS)})")
        self.budgets, self.metric, self.targets = tuple(budgets), metric, targets or {}
        self.weights = {b: 1.0 for b in self.budgets}

    def update(self, accuracies):
        """New weights from {budget: Prec@1}."""
        if self.metric == "none":
            return
        t, a = self.targets, accuracies
        if self.metric == "l2":
            r = {b: (t[b] - a[b]) ** 2 for b in self.budgets}
        else:
            r = {b: max(0.0, 1.0 - a[b] / t[b]) for b in self.budgets}
        total = sum(r.values())
        self.weights = {b: len(r) * r[b] / total if total > 0 else 1.0 for b in self.budgets}

    def __call__(self, step):
        return self.weights[step.target]


class Loss:
    """The sum of the terms, times `weight(step)` when given (e.g. BudgetAwareness). `loss(step) -> (total,
    values)`: values maps '<name>_loss' to each detached term (unweighted) and holds the terms' metrics, and
    'loss_weight' the weight. A term that returns None takes no part in this step."""

    def __init__(self, terms, weight=None):
        self.terms = list(terms)
        self.weight = weight

    def __call__(self, step):
        total: Optional[torch.Tensor] = None
        values = {}
        for term in self.terms:
            out = term(step)
            if out is None:
                continue
            value, metrics = out if isinstance(out, tuple) else (out, {})
            total = value if total is None else total + value
            values[f"{term.name}_loss"] = value.detach()
            values.update(metrics)
        if self.weight is not None:
            weight = self.weight(step)
            values["loss_weight"] = torch.as_tensor(float(weight))
            total = total * weight
        return total, values
