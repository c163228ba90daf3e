"""The fused CPU kernels (dynconv/fused) against the eager ops they replace: values and every gradient."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from dynconv import MaskUnit, fused, set_gate_schedule
from dynconv.maskunit import MaskLogits
from dynconv.models import create_model

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")


def channels_last(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (3, 5, 7, 9), (1, 64, 1, 1), (130, 3, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_residual_relu_equals_the_eager_ops(shape, dtype):
    identity, residual = channels_last(*shape, dtype=dtype), channels_last(*shape, dtype=dtype)
    n, _, h, w = shape
    hard = (torch.rand(n, 1, h, w) > 0.5).to(dtype).requires_grad_()
    assert fused.usable(identity, residual), "the fused kernels did not build"
    got = fused.FusedMaskedResidualReLU.apply(identity, residual, hard)
    expected = torch.relu(torch.addcmul(identity, residual, hard))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    inputs = (identity, residual, hard)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b)


def test_fused_and_eager_training_steps_agree(monkeypatch):
    """A DynConv ResNet's loss and parameter gradients are the same with the kernels and without them."""
    model = create_model("resnet8", gate_layer=MaskUnit).double().to(memory_format=torch.channels_last).train()
    set_gate_schedule(model, noise=False)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    calls = []
    apply = fused.FusedMaskedResidualReLU.apply
    monkeypatch.setattr(fused.FusedMaskedResidualReLU, "apply", lambda *args: calls.append(1) or apply(*args))
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("DYNCONV_FUSED", setting)
        model.zero_grad()
        logits, masks = model(images)
        loss = logits.square().sum() + sum(m.hard.sum() for m in masks)  # a gradient through every mask too
        loss.backward()
        results[setting] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 3  # every block of resnet8 ran the kernels when they were on, none when off
    for a, b in zip(results["1"], results["0"]):
        torch.testing.assert_close(a, b)


def test_other_tensors_take_the_eager_path(monkeypatch):
    x = torch.randn(2, 4, 3, 3)  # contiguous, not channels-last
    assert not fused.usable(x)
    assert not fused.usable(x.to(torch.float16).contiguous(memory_format=torch.channels_last))
    monkeypatch.setenv("DYNCONV_FUSED", "0")
    assert not fused.usable(x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("rows,channels,kept", [(100, 24, 30), (49, 2048, 15), (7, 3, 7), (10, 16, 0)])
def test_scatter_add_relu_rows_equals_the_eager_ops(rows, channels, kept):
    """The engine's masked residual add + ReLU on the chosen rows only against its specification (index_add_,
    then the ReLU over the whole map, valid since the map is a ReLU output outside idx); rows the add makes
    negative are clipped, the others are left alone."""
    torch.manual_seed(0)
    dst = torch.randn(rows, channels).relu_()
    idx = torch.randperm(rows)[:kept]
    residual = torch.randn(kept, channels)
    expected = dst.clone().index_add_(0, idx, residual).relu_()
    got = dst.clone()
    assert fused.scatter_add_relu_rows_(got, idx, residual) is not None
    assert torch.equal(got, expected)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(got[untouched], dst[untouched])


@pytest.mark.parametrize("rows,channels,kept", [(100, 24, 30), (49, 768, 15), (10, 16, 0)])
def test_scatter_add_rows_equals_index_add(rows, channels, kept):
    """The masked residual add without an activation (ConvNeXt) against index_add_: negative sums stay."""
    torch.manual_seed(0)
    dst = torch.randn(rows, channels)
    idx = torch.randperm(rows)[:kept]
    residual = torch.randn(kept, channels)
    got = dst.clone()
    assert fused.scatter_add_rows_(got, idx, residual) is got
    assert torch.equal(got, dst.clone().index_add_(0, idx, residual))


@pytest.mark.parametrize("rows,channels,kept", [(100, 24, 30), (197, 256, 110), (7, 3, 7), (10, 16, 0)])
def test_scatter_rows_equals_index_copy(rows, channels, kept):
    """The engine's row copy into a map against index_copy_: the chosen rows replaced, the others untouched
    (NaN stays NaN: the engine's buffers leave the rows no conv reads unset)."""
    torch.manual_seed(0)
    dst = torch.randn(rows, channels)
    dst[::3] = float("nan")
    idx = torch.randperm(rows)[:kept]
    values = torch.randn(kept, channels)
    got = dst.clone()
    assert fused.scatter_rows_(got, idx, values) is got
    expected = dst.clone().index_copy_(0, idx, values)
    assert torch.allclose(got, expected, equal_nan=True, rtol=0, atol=0)


def test_scatter_add_relu_rows_refuses_an_index_outside_the_map():
    with pytest.raises(RuntimeError, match="out of range"):
        fused.scatter_add_relu_rows_(torch.zeros(4, 8), torch.tensor([4]), torch.ones(1, 8))


def _tile_logits_spec(unit, x, tile):
    """MaskLogits' per-position logits (a 3x3 conv, plus the fc on the global average), average-pooled."""
    stride = unit.conv.stride[0]
    logits = F.conv2d(x, unit.conv.weight, unit.conv.bias, stride, 1) + unit.fc(x.mean((2, 3)))[:, :, None, None]
    return F.avg_pool2d(logits, tile, tile, ceil_mode=True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (13, 17), (7, 6), (1, 1)])
@pytest.mark.parametrize("tile", [1, 2, 3, 8])
def test_tile_logits_equal_the_pooled_logits(stride, size, tile):
    """The fused kernel against the conv's logits pooled to the tiles (odd sizes: tiles over the border)."""
    unit = MaskLogits(5, stride).eval()
    x = torch.randn(3, 5, *size).relu().contiguous(memory_format=torch.channels_last)
    calls = []
    kernel = fused.tile_logits
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "tile_logits", lambda *args: calls.append(1) or kernel(*args))
        got = unit.tile_logits(x, tile)
        expected = _tile_logits_spec(unit, x, tile)
    assert calls == [1]  # the kernel ran
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tile_logits_by_hand():
    """A 4 x 4 map of ones, 3x3 weights of ones, 2 x 2 tiles: the top-left tile's positions see 4, 6, 6 and 9
    pixels of the map (mean 6.25); the fc (weight 2, bias 0.5) on the average 1 and the conv bias 1 add 3.5."""
    unit = MaskLogits(1, 1).eval()
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
        unit.conv.bias.fill_(1.0)
        unit.fc.weight.fill_(2.0)
        unit.fc.bias.fill_(0.5)
        got = unit.tile_logits(torch.ones(1, 1, 4, 4).contiguous(memory_format=torch.channels_last), 2)
    torch.testing.assert_close(got, torch.full((1, 1, 2, 2), 9.75))  # every tile is a corner of the map


def test_tile_logits_with_gradients_take_the_spec():
    """Training needs the gradient: the per-position logits, pooled (the kernel has no backward)."""
    unit = MaskLogits(4, 1)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    got = unit.tile_logits(x, 3)
    got.sum().backward()
    assert x.grad is not None and got.shape == (2, 1, 2, 2)
    torch.testing.assert_close(got.detach(), _tile_logits_spec(unit, x.detach(), 3))


def test_tiled_unit_decides_as_its_pooled_logits():
    """In evaluation a tiled mask unit decides from the fused tile logits; the same as pooling its per-position
    logits (training's route), here for 4 x 4 tiles on a 10 x 10 map with a strided unit."""
    unit = MaskUnit(8, stride=2, tile=4).eval()
    x = torch.randn(2, 8, 19, 20).relu().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        decision = unit(x)
        reference = unit.decide(unit.maskconv(x), x.shape[-2:])
    assert decision.hard.shape == (2, 1, 10, 10)
    torch.testing.assert_close(decision.hard, reference.hard)
    assert decision.overhead == reference.overhead


@pytest.mark.parametrize("tile", [1, 2, 3, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(16, 16), (13, 9)])
@pytest.mark.parametrize("dilated", [True, False])
def test_tile_masks_equal_the_eager_decision(monkeypatch, tile, stride, size, dilated):
    """Threshold, tile expansion and dilation (at the unit's stride, cropped to odd input sizes) and the index
    lists in one op, against MaskUnit.decide's ATen ops and nonzero()."""
    from dynconv.decisions import UnitCost

    unit = MaskUnit(4, stride=stride, dilate_stride=stride, tile=tile,
                    dilated_cost=UnitCost(1, 1) if dilated else None).eval()
    out = unit.output_size(size)
    logits = torch.randn(3, 1, -(-out[0] // tile), -(-out[1] // tile))
    logits[0], logits[1] = -1.0, 1.0  # an image with every tile off, one with every tile on
    calls = []
    kernel = fused.tile_masks
    monkeypatch.setattr(fused, "tile_masks", lambda *args: calls.append(1) or kernel(*args))
    got = unit.decide(logits, size, pooled=True)
    monkeypatch.setenv("DYNCONV_FUSED", "0")
    expected = unit.decide(logits, size, pooled=True)
    assert calls == [1] and expected.positions is None
    assert got.hard.shape == expected.hard.shape == (3, 1, *out)
    assert torch.equal(got.hard, expected.hard) and got.overhead == expected.overhead and got.hard[0].sum() == 0
    hard_rows, dilated_rows = got.active_positions()
    expected_hard_rows, expected_dilated_rows = expected.active_positions()  # computed from the masks
    assert torch.equal(hard_rows, expected_hard_rows)
    assert torch.equal(hard_rows, expected.hard.reshape(-1).nonzero().squeeze(1))
    assert 0 < hard_rows.numel() < got.hard.numel()
    if not dilated:
        assert got.dilated is None and expected.dilated is None and dilated_rows is None
        assert expected_dilated_rows is None
        return
    assert torch.equal(got.dilated, expected.dilated) and got.dilated[0].sum() == 0
    assert got.dilated.shape[-2:] == (size if stride > 1 else out)
    assert torch.equal(dilated_rows, expected.dilated.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(dilated_rows, expected_dilated_rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_per_position_unit_takes_the_kernel_at_batch_1_only(monkeypatch, batch):
    """Tile 1 in evaluation: at batch 1 the logits come from the fused kernel, at other batch sizes from the tap
    product; the masks are those of the tap product's logits either way."""
    unit = MaskUnit(6, stride=1, tile=1).eval()
    x = torch.randn(batch, 6, 9, 11).relu().contiguous(memory_format=torch.channels_last)
    calls = []
    kernel = fused.tile_logits
    monkeypatch.setattr(fused, "tile_logits", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        decision = unit(x)
        reference = unit.decide(unit.maskconv(x), x.shape[-2:])
    assert len(calls) == (1 if batch == 1 else 0)
    torch.testing.assert_close(decision.hard, reference.hard)
