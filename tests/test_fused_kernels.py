"""The fused CPU kernels (dynconv/fused) against the eager ops they replace: values and every gradient."""
import shutil

import pytest
import torch

from dynconv import MaskUnit, fused, set_gate_schedule
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


def test_scatter_add_relu_rows_refuses_an_index_outside_the_map():
    with pytest.raises(RuntimeError, match="out of range"):
        fused.scatter_add_relu_rows_(torch.zeros(4, 8), torch.tensor([4]), torch.ones(1, 8))
