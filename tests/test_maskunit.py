import math

import pytest
import torch
import torch.nn as nn

from dynconv import MaskUnit, SparsityCriterion, UnitCost, budget_bounds, dilate_mask
from dynconv.decisions import SpatialDecision


@pytest.mark.parametrize("stride,size,expected", [(1, 8, 8), (2, 8, 4), (2, 7, 4), (1, 5, 5)])
def test_mask_unit_shapes(stride, size, expected):
    unit = MaskUnit(16, stride=stride, dilate_stride=stride, dilated_cost=UnitCost(1, 1)).train()
    x = torch.randn(3, 16, size, size)
    decision = unit(x)
    hard, dilated, soft = decision.hard, decision.dilated, decision.soft
    assert hard.shape == soft.shape == (3, 1, expected, expected)
    # dilated mask at the first conv's resolution: input size for strided bottlenecks, output size otherwise
    assert dilated.shape == ((3, 1, size, size) if stride > 1 else (3, 1, expected, expected))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}


def test_mask_unit_without_dilated_cost_has_no_dilated_mask():
    """Blocks whose layers all run at the mask (e.g. ConvNeXt's) need no dilated mask."""
    decision = MaskUnit(4).eval()(torch.randn(2, 4, 6, 6))
    assert decision.dilated is None
    assert decision.overhead.macs == 2 * 36 * (9 * 4 + 1)  # the 3x3 conv C -> 1 with bias, per output position


def test_dilate_stride1_by_hand():
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 0, 0] = 1
    m[0, 0, 3, 2] = 1
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0]], dtype=torch.float32)
    assert torch.equal(dilate_mask(m)[0, 0], expected)


def test_dilate_stride2_by_hand():
    # mask at output resolution 3x3; element (y, x) sits at input position (2y, 2x), then a 3x3 dilation
    m = torch.zeros(1, 1, 3, 3)
    m[0, 0, 1, 1] = 1  # -> input (2, 2) -> rows/cols 1..3
    m[0, 0, 0, 2] = 1  # -> input (0, 4) -> rows 0..1, cols 3..5 (cropped to 0..4 for a 5x5 input)
    expected = torch.tensor([[0, 0, 0, 1, 1],
                             [0, 1, 1, 1, 1],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(dilate_mask(m, dilate_stride=2, output_size=(5, 5))[0, 0], expected)
    assert dilate_mask(m, dilate_stride=2).shape[-2:] == (6, 6)


def test_straight_through_gradient():
    unit = MaskUnit(4).train()
    unit.gumbel_noise = False
    unit.temperature = 2.0
    x = torch.randn(2, 4, 5, 5)
    decision = unit(x)
    hard, soft = decision.hard, decision.soft
    logits = unit.maskconv(x)
    assert torch.equal(hard.detach(), (torch.sigmoid(logits / 2.0) >= 0.5).float())
    # the gradient of hard is the gradient of soft = sigmoid(logits / T)
    weights = torch.randn_like(hard)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), unit.maskconv.conv.bias, retain_graph=True)
    soft_again = torch.sigmoid(unit.maskconv(x) / 2.0)
    (g_soft,) = torch.autograd.grad((soft_again * weights).sum(), unit.maskconv.conv.bias)
    torch.testing.assert_close(g_hard, g_soft)
    # with soft used as well, the gradients reaching hard and soft add up: both are soft's
    w_soft = torch.randn_like(hard)
    (got,) = torch.autograd.grad((hard * weights + soft * w_soft).sum(), unit.maskconv.fc.weight)
    soft_again = torch.sigmoid(unit.maskconv(x) / 2.0)
    (expected,) = torch.autograd.grad((soft_again * (weights + w_soft)).sum(), unit.maskconv.fc.weight)
    torch.testing.assert_close(got, expected)


def test_eval_mask_is_sign_of_logits_without_noise():
    unit = MaskUnit(4).eval()
    x = torch.randn(2, 4, 6, 6)
    decision = unit(x)
    hard = decision.hard
    assert decision.soft is None
    assert torch.equal(hard, (unit.maskconv(x) >= 0).float())
    assert torch.equal(unit(x).hard, hard)  # deterministic


def test_gumbel_noise_changes_training_masks():
    torch.manual_seed(0)
    unit = MaskUnit(4).train()
    x = torch.randn(2, 4, 16, 16)
    assert not torch.equal(unit(x).hard, unit(x).hard)
    unit.set_schedule(noise=False)
    assert torch.equal(unit(x).hard, unit(x).hard)


def test_gumbel_difference_has_the_distribution_of_two_gumbel_samples():
    """logit(U) against the reference's explicit g1 - g2, g = -log(-log(U + 1e-8) + 1e-8): a two-sample
    Kolmogorov-Smirnov distance far below what a different distribution (e.g. one Gumbel) gives."""
    from dynconv.maskunit import sample_gumbel_difference

    torch.manual_seed(0)
    n = 200_000
    like = torch.empty(n, dtype=torch.float64)

    def gumbel():
        return -torch.log(-torch.log(torch.rand(n, dtype=torch.float64) + 1e-8) + 1e-8)

    reference = torch.sort(gumbel() - gumbel()).values
    ours = sample_gumbel_difference(like)
    assert ours.shape == like.shape and ours.dtype == like.dtype

    def ks_distance(sample):
        cdf_ours = torch.searchsorted(torch.sort(sample).values, reference, right=True) / n
        return (cdf_ours - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max().item()

    assert ks_distance(ours) < 0.007  # the critical value at level 1e-4 for n = m = 200000
    assert ks_distance(gumbel()) > 0.05  # the test can fail: a single Gumbel is far off


@pytest.mark.parametrize("epoch,lower,upper", [
    (0, 0.3, 0.3),  # a = 1: the bounds start at the budget
    (33, 0.0, 1.0),  # p = 1: a = 0, bounds fully open
    (50, 0.0, 1.0),
])
def test_budget_bounds_endpoints(epoch, lower, upper):
    lo, up = budget_bounds(0.3, epoch, 100)
    assert lo == pytest.approx(lower, abs=1e-12) and up == pytest.approx(upper, abs=1e-12)


def test_budget_bounds_midway_by_hand():
    # E = 100, epoch 16.5 -> p = 0.5, a = cos(pi/4)^2 = 0.5; b = 0.3: upper = 1 - 0.5*0.7 = 0.65, lower = 0.15
    lo, up = budget_bounds(0.3, 16.5, 100)
    assert lo == pytest.approx(0.15) and up == pytest.approx(0.65)


def _mask(hard, dilated, fpp, fpp_dil):
    return SpatialDecision(torch.tensor(hard, dtype=torch.float32).view(1, 1, 2, 2),
                           torch.tensor(dilated, dtype=torch.float32).view(1, 1, 2, 2), None,
                           UnitCost(fpp, fpp), UnitCost(fpp_dil, fpp_dil))


def test_sparsity_criterion_by_hand():
    # block 1: 1 of 4 mask, 2 of 4 dilated, fpp 10, fpp_dil 30 -> c = 2*30 + 1*10 = 70, t = 4*30 + 4*10 = 160
    # block 2: 4 of 4 and 4 of 4, fpp 20, fpp_dil 20 -> c = t = 160
    masks = [_mask([1, 0, 0, 0], [1, 1, 0, 0], 10, 30), _mask([1, 1, 1, 1], [1, 1, 1, 1], 20, 20)]
    budget, epoch, epochs = 0.5, 5, 30  # p = 5 / 9.9, a = cos(p pi / 2)^2
    a = math.cos(5 / 9.9 * math.pi / 2) ** 2
    upper, lower = 1 - a * 0.5, a * 0.5
    f1, f2 = 70 / 160, 1.0
    block = ((max(f1 - upper, 0) ** 2 + max(lower - f1, 0) ** 2) + (max(f2 - upper, 0) ** 2 + max(lower - f2, 0) ** 2)) / 2
    network = ((70 + 160) / 320 - budget) ** 2
    loss, cost, block_costs = SparsityCriterion(budget, epochs)(masks, epoch)
    assert loss.item() == pytest.approx(10 * (network + block), rel=1e-6)
    assert cost.item() == pytest.approx(230 / 320)
    assert block_costs.tolist() == pytest.approx([f1, f2])


@pytest.mark.parametrize("batch,channels,size,stride", [(2, 128, (9, 9), 1), (2, 160, (33, 31), 2),
                                                        (2, 256, (1, 1), 1), (2, 128, (7, 5), 2), (2, 8, (6, 9), 2),
                                                        (70, 3, (8, 8), 1), (130, 4, (9, 7), 2)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_tap_logits_equal_the_conv(batch, channels, size, stride, layout):
    """tap_logits (one matrix product and a window sum: F.fold on small maps, shifted adds on large ones, where
    batch * H * W > 4096) gives the conv + fc's logits and, through TapLogits.backward, their gradients."""
    from dynconv.maskunit import MaskLogits, tap_logits

    logits = MaskLogits(channels, stride).double()
    nn.init.normal_(logits.conv.bias)
    x = torch.randn(batch, channels, *size, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    expected = logits.conv(x) + logits.fc(x.mean((2, 3)))[:, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(tap_logits(x, *logits.tap_matrix(), stride), expected)
        torch.testing.assert_close(logits(x), expected)  # the module without autograd: taps at every stride
    got = logits(x)  # with autograd: TapLogits at stride 1, else the conv
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    params = (x, logits.conv.weight, logits.conv.bias, logits.fc.weight, logits.fc.bias)
    for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b)

