"""The method-agnostic core: decisions state their cost, the counter and the sparsity objective read them, the
loss is a sum of named terms, every registered model honours the forward contract, the engine finds plans by
block type."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv import (ChannelDecision, Dynamic, Gate, MaskUnit, SparsityCriterion, SpatialDecision, StaticDecision,
                     UnitCost, count_mmac, set_gate_schedule)
from dynconv.objectives import DecisionLosses, Distillation, Loss, Sparsity, StepOutput, TaskLoss
from dynconv.sparse.engine import SparseEngine
from dynconv.models import create_model, list_models
from dynconv.models.base import DynamicNetwork


# ---- decisions ----

def test_channel_decision_cost_by_hand():
    # 2 images keep 3 and 1 of 4 channels; 5 MACs per kept channel and position, 6 positions; overhead 7
    kept = torch.tensor([[1., 1., 1., 0.], [0., 1., 0., 0.]])
    d = ChannelDecision(kept, UnitCost(5, 9), positions=6, overhead=UnitCost(7, 8))
    executed, total = d.conditional()
    assert executed.item() == 4 * 5 * 6 and total == 8 * 5 * 6
    assert float(d.macs()) == 4 * 5 * 6 + 7 and float(d.macs(full=True)) == 4 * 9 * 6 + 8


def test_spatial_decision_with_and_without_dilated_mask():
    hard = torch.tensor([1., 0., 1., 1.]).view(1, 1, 2, 2)
    dilated = torch.ones(1, 1, 2, 2)
    d = SpatialDecision(hard, dilated, None, UnitCost(10, 12), UnitCost(3, 4), overhead=UnitCost(100, 101))
    assert d.conditional()[0].item() == 3 * 10 + 4 * 3 and d.conditional()[1] == 4 * 10 + 4 * 3
    assert float(d.macs()) == 3 * 10 + 4 * 3 + 100 and float(d.macs(full=True)) == 3 * 12 + 4 * 4 + 101
    alone = SpatialDecision(hard, None, None, UnitCost(10, 12))
    assert alone.conditional()[0].item() == 30 and alone.conditional()[1] == 40


def test_sparsity_criterion_ignores_decisions_without_conditional_work():
    spatial = SpatialDecision(torch.tensor([1., 0., 0., 0.]).view(1, 1, 2, 2), None, None, UnitCost(10, 10))
    static = StaticDecision(UnitCost(1000, 1000))
    with_static = SparsityCriterion(0.5, 10)([spatial, static], 5)
    alone = SparsityCriterion(0.5, 10)([spatial], 5)
    assert with_static[0].item() == pytest.approx(alone[0].item())
    assert with_static[1].item() == pytest.approx(0.25)


# ---- the MAC counter on a toy model: pointwise Linears count per position, decisions add their own MACs ----

class ToyGate(Gate):
    """Keeps the first `keep` of 4 input channels of every image; its own Linear is its overhead."""

    def __init__(self, keep):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.keep = keep

    def uncounted_modules(self, full=False):
        return (self.fc,)

    def forward(self, x, target=None):
        kept = torch.zeros(x.shape[0], 4)
        kept[:, :self.keep] = 1
        return ChannelDecision(kept, UnitCost(3, 3), positions=x.shape[-2] * x.shape[-1],
                               overhead=UnitCost(x.shape[0] * 20, x.shape[0] * 20))


class ToyNet(DynamicNetwork):
    def __init__(self, keep=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)  # 12 MACs per position
        self.pointwise = nn.Linear(4, 8)  # applied per position: 4 * 8 + 8 = 40
        self.gate = ToyGate(keep)
        self.head = nn.Linear(8, 5)  # on pooled features; left out of the default count by the model

    def uncounted_modules(self, full=False):
        return () if full else (self.head,)

    def forward_features(self, x, target=None):
        x = self.conv(x)
        decision = self.gate(x)
        return self.pointwise(x.permute(0, 2, 3, 1)).mean((1, 2)), [decision]

    def forward_head(self, x):
        return self.head(x)

    def get_classifier(self):
        return self.head


def test_counter_counts_pointwise_linears_and_decisions_by_hand():
    model = ToyNet(keep=2)
    per_image_positions = 5 * 6
    expected = per_image_positions * (12 + 40) + 2 * 3 * per_image_positions + 20
    assert count_mmac(model, torch.randn(3, 3, 5, 6)) * 1e6 == pytest.approx(expected)
    # the full count adds the head (8 * 5 + 5 per image); no norms or activations in this net
    assert count_mmac(model, torch.randn(3, 3, 5, 6), full=True) * 1e6 == pytest.approx(expected + 45)


# ---- every registered model: the forward contract, costs, gradients ----

@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n in ("resnet8", "resnet18", "resnet50")])
def test_registered_models_return_decisions_whose_costs_the_counter_reads(name):
    model = create_model(name, gate_layer=MaskUnit, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, decisions = model(x, target=None)
    assert logits.shape == (2, 7) and decisions and all(isinstance(d, SpatialDecision) for d in decisions)
    static = create_model(name, num_classes=7).eval()
    assert static(x)[1] == []
    # MACs of the batch = the static network's - its gated layers' full cost + what the decisions executed
    with torch.no_grad():
        gated_total = sum(d.conditional()[1] for d in decisions)
        executed = sum(float(d.macs()) for d in decisions)
    assert count_mmac(model, x) == pytest.approx((2 * count_mmac(static, x) * 1e6 - gated_total + executed) / 2e6)


def test_every_parameter_of_a_gated_model_gets_a_gradient_through_the_loss_terms():
    model = create_model("resnet8", gate_layer=MaskUnit).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, decisions = model(images)
    loss = Loss([TaskLoss(), Sparsity(0.5, 10)])
    total, values = loss(StepOutput(images, logits, decisions, labels, epoch=1.0))
    total.backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert set(values) == {"task_loss", "sparsity_loss", "cost", "block_cost"}


# ---- objectives ----

def _step(logits, labels, decisions=()):
    return StepOutput(torch.zeros(len(logits), 3, 2, 2), logits, list(decisions), labels, epoch=0.0)


def test_loss_is_the_sum_of_its_named_terms():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    total, values = Loss([TaskLoss(), TaskLoss(smoothing=0.1)])(_step(logits, labels))
    plain = F.cross_entropy(logits, labels)
    # smoothing eps over K classes: (1 - eps) * CE + eps * mean over classes of -log p
    smooth = 0.9 * plain + 0.1 * (-F.log_softmax(logits, 1)).mean(1).mean()
    assert total.item() == pytest.approx((plain + smooth).item(), rel=1e-6)
    assert list(values) == ["task_loss"]  # both terms share the name: the last one is reported


def test_task_loss_with_soft_targets_matches_timm():
    from timm.loss import SoftTargetCrossEntropy

    logits = torch.randn(4, 5)
    soft = torch.softmax(torch.randn(4, 5), 1)
    assert TaskLoss()(_step(logits, soft)).item() == pytest.approx(SoftTargetCrossEntropy()(logits, soft).item())


def test_distillation_by_hand():
    teacher = nn.Linear(12, 3, bias=False)
    student_logits = torch.tensor([[1.0, 2.0, 3.0]])
    images = torch.randn(1, 3, 2, 2)
    t_logits = teacher(images.flatten(1)).detach()
    step = StepOutput(images, student_logits, [], torch.tensor([0]), 0.0)

    class Flat(nn.Module):
        def forward(self, x):
            return teacher(x.flatten(1))

    T = 4.0
    p = torch.softmax(t_logits / T, 1)
    q = torch.log_softmax(student_logits / T, 1)
    expected = 0.5 * (p * (p.log() - q)).sum() * T * T
    assert Distillation(Flat(), temperature=T, weight=0.5)(step).item() == pytest.approx(expected.item(), rel=1e-5)


def test_decision_losses_sum_what_decisions_carry():
    d1, d2 = StaticDecision(UnitCost()), StaticDecision(UnitCost())
    d1.loss, d2.loss = torch.tensor(0.25), torch.tensor(0.5)
    assert DecisionLosses()(_step(torch.zeros(1, 3), torch.tensor([0]), [d1, d2])).item() == pytest.approx(0.75)
    assert DecisionLosses()(_step(torch.zeros(1, 3), torch.tensor([0]), [StaticDecision(UnitCost())])) is None
    # a term that returns None takes no part: nothing logged for it
    total, values = Loss([TaskLoss(), DecisionLosses()])(_step(torch.zeros(1, 3), torch.tensor([0])))
    assert list(values) == ["task_loss"] and total.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


# ---- gates and the schedule ----

def test_gate_schedule_reaches_every_gate():
    model = create_model("resnet8", gate_layer=MaskUnit)
    set_gate_schedule(model, noise=False, temperature=3.0, progress=0.5)
    units = [m for m in model.modules() if isinstance(m, MaskUnit)]
    assert len(units) == 3 and all(not u.gumbel_noise and u.temperature == 3.0 for u in units)


@pytest.mark.parametrize("epochs,last_noisy", [(30, 24), (10, 8), (350, 280)])
def test_gumbel_noise_follows_the_reference_rule(epochs, last_noisy):
    """Noise while not (epoch > 0.8 * epochs), epoch 0-based: with 30 epochs it is off from index 25."""
    from types import SimpleNamespace

    from dynconv.utils.fit import gumbel_noise_on

    args = SimpleNamespace(gumbel_noise_epochs=0.8, epochs=epochs)
    assert gumbel_noise_on(last_noisy, args) and not gumbel_noise_on(last_noisy + 1, args)


# ---- engine plans ----

def test_engine_refuses_a_gated_block_without_a_plan():
    class UnplannedBlock(Dynamic, nn.Module):
        def __init__(self):
            super().__init__()
            self.masker = MaskUnit(4)

        def forward(self, x, target=None):
            return x, self.masker(x)

    with pytest.raises(ValueError, match="unsupported block type UnplannedBlock"):
        SparseEngine(nn.Sequential(UnplannedBlock()).eval())


def test_drop_path_rates_rise_linearly_and_act_only_in_training():
    model = create_model("resnet8", gate_layer=MaskUnit, drop_path_rate=0.5)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.stages for b in stage]
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    x = torch.randn(8, 3, 32, 32)
    model.train()
    set_gate_schedule(model, noise=False)
    torch.manual_seed(0)
    first = model(x)[0]
    assert not torch.equal(first, model(x)[0])  # different residual branches dropped
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_build_model_adds_spatial_gates_only_to_families_that_decide_where():
    """One construction path: spatial gates per block (one per budget with targets) for spatial families,
    never for a model with gates of its own; options reach the factory; a wrong option is one ModelOptionError."""
    from dynconv.models import ModelOptionError, build_model

    def mask_units(model):
        return sum(isinstance(m, MaskUnit) for m in model.modules())

    assert mask_units(build_model("resnet8", 10)) == 0
    assert mask_units(build_model("resnet8", 10, spatial_gates=True)) == 3  # ResNet-8: 3 residual blocks
    multi = build_model("resnet8", 10, targets=(0.25, 0.5))
    assert mask_units(multi) == 6 and multi.fc.out_features == 10
    assert mask_units(build_model("dydensenet86", 10, spatial_gates=True)) == 0  # DGC: its own gates
    tiled = build_model("resnet8", 10, spatial_gates=True, options={"tiles": (4, 2, 1)})
    assert [m.tile for m in tiled.modules() if isinstance(m, MaskUnit)] == [4, 2, 1]
    with pytest.raises(ModelOptionError, match="resnet8 does not take 'heads'"):
        build_model("resnet8", 10, options={"heads": 4})
