"""Multi-target models (the budget-aware paper's): each budget has its own mask units and, in ResNets, its own
block norms; everything else is shared. Checked against single-budget models holding one budget's weights
(logits, masks and MACs equal), through the sparse engine per budget, and the per-target layer's rules."""
import re

import pytest
import torch

from dynconv import MaskUnit, count_mmac, count_parameters
from dynconv.multitarget import PerTarget, model_targets, per_target, target_key
from dynconv.sparse.engine import SparseEngine
from models import create_model

BUDGETS = (0.25, 0.5, 0.75)
MODELS = [("resnet8", 32), ("resnet18", 64), pytest.param("resnet50", 64, marks=pytest.mark.slow), ("convnext_atto", 64)]


def randomised(model):
    """Eval mode with BatchNorm statistics and affine parameters away from their initial values, so that a
    wrong norm or gate shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def single_budget_state(multi_state, budget):
    """The state dict of the single-budget model of `budget`: its variants renamed, the other budgets' dropped
    (a second implementation of the key layout: `<layer>.<key>.` -> `<layer>.`)."""
    keys = {target_key(b) for b in BUDGETS}
    out = {}
    for key, value in multi_state.items():
        match = re.search(r"\.(bn\d|masker)\.(\d+)\.", key)
        if match is None:
            out[key] = value
        elif match.group(2) == target_key(budget):
            out[key.replace(match.group(0), f".{match.group(1)}.")] = value
        else:
            assert match.group(2) in keys, key
    return out


@pytest.mark.parametrize("name,size", MODELS)
def test_each_budget_is_the_single_budget_model_with_its_weights(name, size):
    torch.manual_seed(0)
    multi = randomised(create_model(name, gate_layer=MaskUnit, targets=BUDGETS, num_classes=10))
    assert model_targets(multi) == BUDGETS
    x = torch.randn(2, 3, size, size)
    logits_per_budget = []
    for budget in BUDGETS:
        single = create_model(name, gate_layer=MaskUnit, num_classes=10).eval()
        single.load_state_dict(single_budget_state(multi.state_dict(), budget))
        with torch.no_grad():
            logits, decisions = multi(x, target=budget)
            expected, expected_decisions = single(x)
        torch.testing.assert_close(logits, expected)
        assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
        assert count_mmac(multi, x, target=budget) == pytest.approx(count_mmac(single, x))
        logits_per_budget.append(logits)
    # the budgets' own gates (and norms) make a difference: no two budgets give the same logits
    assert not torch.allclose(logits_per_budget[0], logits_per_budget[1])


def test_only_gates_and_block_norms_are_per_budget():
    multi = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS)
    keys = multi.state_dict().keys()
    per_budget = {k for k in keys if re.search(r"\.(bn\d|masker)\.\d+\.", k)}
    assert "layer2.0.bn1.025.running_mean" in per_budget and "layer2.0.masker.075.maskconv.conv.weight" in keys
    assert {"conv1.weight", "bn1.weight", "layer2.0.conv1.weight", "layer2.0.downsample.1.running_var",
            "fc.weight"} <= set(keys) - per_budget  # stem, convs, downsample (with its BN), classifier: shared
    single = create_model("resnet8", gate_layer=MaskUnit)
    norms = sum(p.numel() for n, p in single.named_parameters() if re.search(r"\.bn\d\.", n))
    gates = sum(p.numel() for n, p in single.named_parameters() if ".masker." in n)
    assert count_parameters(multi) == count_parameters(single) + 2 * (norms + gates)


def test_convnext_tiny_pays_66276_parameters_per_budget():
    """The issue's number: a mask unit per block per budget (about 10 C + 2 each), the norms shared."""
    dense = count_parameters(create_model("convnext_tiny"))
    for budgets in ((0.5,), (0.3, 0.5, 0.7)):
        multi = create_model("convnext_tiny", gate_layer=MaskUnit, targets=budgets)
        assert count_parameters(multi) - dense == 66_276 * len(budgets)


@pytest.mark.parametrize("name,size", MODELS[1:])
def test_the_engine_runs_every_budget(name, size):
    torch.manual_seed(0)
    multi = randomised(create_model(name, gate_layer=MaskUnit, targets=BUDGETS, num_classes=10))
    multi = multi.to(memory_format=torch.channels_last)
    engine = SparseEngine(multi, backend="torch", dense_above=1.1, gather_overhead_macs=0, min_gather_width=0)
    x = torch.randn(2, 3, size, size)
    for budget in BUDGETS[::-1] + BUDGETS:  # each budget after another one: nothing of the last one sticks
        with torch.no_grad():
            expected, expected_decisions = multi(x, target=budget)
            got, decisions = engine(x, target=budget)
        assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_per_target_layers():
    assert [target_key(b) for b in (0.3, 0.25, 0.5, 1)] == ["03", "025", "05", "10"]
    with pytest.raises(ValueError, match="distinct targets"):
        PerTarget({0.5: torch.nn.BatchNorm2d(4), "0.5": torch.nn.BatchNorm2d(4)})
    norms = per_target(torch.nn.BatchNorm2d, (0.3, 0.5))(4)
    with pytest.raises(ValueError, match="no operating point 0.4; this model has 0.3, 0.5"):
        norms.select(0.4)
    assert norms.variant(0.3).weight is not norms.variant(0.5).weight
    norms.tie_affine()
    assert norms.variant(0.3).weight is norms.variant(0.5).weight  # one Parameter ...
    assert norms.variant(0.3).running_mean is not norms.variant(0.5).running_mean  # ... own statistics
    with pytest.raises(ValueError, match="needs a gate_layer"):
        create_model("resnet8", targets=(0.5,))


@pytest.mark.parametrize("metric,accuracies,expected", [
    ("l2", {0.3: 67.0, 0.5: 71.0}, {0.3: 1.8, 0.5: 0.2}),  # r = 9, 1: w = 2 * 9 / 10, 2 * 1 / 10
    ("l1", {0.3: 63.0, 0.5: 73.0}, {0.3: 2.0, 0.5: 0.0}),  # r = 0.1, max(0, 1 - 73 / 72) = 0
    ("none", {0.3: 63.0, 0.5: 73.0}, {0.3: 1.0, 0.5: 1.0}),
    ("l2", {0.3: 70.0, 0.5: 72.0}, {0.3: 1.0, 0.5: 1.0}),  # both on target: sum(r) = 0, equal weights
])
def test_budget_awareness_weights_by_hand(metric, accuracies, expected):
    from dynconv.objectives import BudgetAwareness, StepOutput

    awareness = BudgetAwareness((0.3, 0.5), metric, {0.3: 70.0, 0.5: 72.0})
    assert awareness.weights == {0.3: 1.0, 0.5: 1.0}  # before the first validation
    awareness.update(accuracies)
    for budget, weight in expected.items():
        step = StepOutput(None, None, [], None, 1.0, target=budget)
        assert awareness(step) == pytest.approx(weight)


def test_distillation_and_the_weighted_loss_by_hand():
    """KD = KL(softmax(t / T) || softmax(s / T)) T^2: for s = (1, 0), t = (0, 1), T = 2 the two distributions are
    (sigmoid(0.5), sigmoid(-0.5)) and its reverse, so KL = (sigmoid(0.5) - sigmoid(-0.5)) * 0.5. The loss of a step
    is w_b times the sum of its terms; the sparsity term takes the step's budget."""
    import math

    from dynconv.objectives import Distillation, Loss, Sparsity, StepOutput
    from dynconv.loss import SparsityCriterion

    class Teacher(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[0.0, 1.0]])

    teacher = Teacher()
    step = StepOutput(None, torch.tensor([[1.0, 0.0]]), [], None, 0.0, target=0.5)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    kd = 4 * (sigmoid(0.5) - sigmoid(-0.5)) * 0.5
    assert Distillation(teacher, temperature=2.0, weight=1.0)(step).item() == pytest.approx(kd)
    total, values = Loss([Distillation(teacher, 2.0, 0.01)], weight=lambda s: 1.5)(step)
    assert total.item() == pytest.approx(1.5 * 0.01 * kd) and values["loss_weight"] == 1.5

    model = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS).train()
    _, decisions = model(torch.randn(2, 3, 16, 16), target=0.25)
    step = StepOutput(None, None, decisions, None, 3.0, target=0.25)
    loss, _ = Sparsity(None, 10)(step)
    torch.testing.assert_close(loss, SparsityCriterion(0.25, 10)(decisions, 3)[0])
