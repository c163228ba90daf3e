"""The engine's tile paths (dynconv/sparse/plans/resnet.py): tiles with their halos run as a batch of small maps,
whole blocks run on the images they are on for. They compute the masked model's function, count what they execute,
and the whole-map gate decides as the mean of the per-position logits."""
import pytest
import torch
import torch.nn as nn

from cuda_emulation import EmulatedKernels
from dynconv import MaskUnit
from dynconv.maskunit import MaskLogits
from dynconv.models import create_model
from dynconv.sparse.cuda_kernels import kernel_sources
from dynconv.sparse.engine import SparseEngine
from dynconv.sparse.masks import SyntheticMaskUnit
from test_engine import make_block, randomise_batchnorm

FORCE_TILES = dict(dense_above=100.0, tile_path=True)  # the tile path (the default on CUDA), never the dense fallback


@pytest.mark.parametrize("stride,size", [(1, (8, 8)), (1, (9, 7)), (2, (16, 16)), (2, (9, 11))])
def test_the_whole_map_logit_is_the_mean_of_the_logits(stride, size):
    """A second implementation: the logits map itself, averaged."""
    torch.manual_seed(stride)
    logits = MaskLogits(6, stride).eval()
    x = torch.randn(3, 6, *size)
    with torch.no_grad():
        expected = logits(x).mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(logits.mean_logit(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.mean_logit(x.contiguous(memory_format=torch.channels_last)), expected,
                                   rtol=1e-5, atol=1e-6)
        logits.fc.bias.add_(1.0)  # changed weights: the cached functional is rebuilt
        torch.testing.assert_close(logits.mean_logit(x), expected + 1.0, rtol=1e-5, atol=1e-6)


def tiled_block(kind, stride, inplanes, planes, tile, density, mask_kind="clustered"):
    torch.manual_seed(1)
    block = randomise_batchnorm(make_block(kind, stride, inplanes, planes)).eval()
    block.masker.tile = tile
    block.masker = SyntheticMaskUnit(block.masker, density, mask_kind, seed=3)
    return block.to(memory_format=torch.channels_last)


def run_both(block, x, **settings):
    with torch.no_grad():
        expected, expected_decision = block(x)
        engine = SparseEngine(nn.Sequential(block).eval(), backend="torch", **settings)
        got, decision = engine.plans[block](x.clone())
    assert torch.equal(decision.hard, expected_decision.hard)
    return got, expected, engine.plans[block]


@pytest.mark.parametrize("kind,inplanes,planes", [("basic", 8, 8), ("basic", 8, 16), ("bottleneck", 16, 4),
                                                  ("bottleneck", 8, 4)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch,size", [(1, (9, 7)), (3, (8, 11))])
@pytest.mark.parametrize("tile", [2, 4, 8])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("settings", [FORCE_TILES, {}], ids=["tiles", "default-choice"])
def test_tiled_block_equals_masked_model(kind, inplanes, planes, stride, batch, size, tile, density, settings):
    """Odd maps: tiles overhang the right and bottom borders, halos reach outside the map everywhere."""
    block = tiled_block(kind, stride, inplanes, planes, tile, density)
    x = torch.relu(torch.randn(batch, inplanes, *size)).contiguous(memory_format=torch.channels_last)
    got, expected, _ = run_both(block, x, **settings)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if density == 0.0 and block.downsample is None:
        assert torch.equal(got, x)  # every tile off: the identity, untouched


def whole_block(kind, stride, inplanes, planes):
    """A block with one decision per image, on for images whose channel 0 averages above 0.9."""
    torch.manual_seed(2)
    block = randomise_batchnorm(make_block(kind, stride, inplanes, planes)).eval()
    block.masker.tile = 1000
    with torch.no_grad():
        logits = block.masker.maskconv
        logits.conv.weight.zero_(), logits.conv.bias.zero_(), logits.fc.weight.zero_()
        logits.fc.weight[0, 0] = 1.0
        logits.fc.bias.fill_(-0.9)
    return block.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind,inplanes,planes", [("basic", 8, 8), ("basic", 8, 16), ("bottleneck", 16, 4)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("on", [(1,), (0,), (1, 0, 1), (0, 1, 0), (1, 1, 1), (0, 0, 0)])
def test_whole_blocks_run_on_the_images_they_are_on_for(kind, inplanes, planes, stride, on):
    block = whole_block(kind, stride, inplanes, planes)
    x = torch.relu(torch.randn(len(on), inplanes, 9, 7))  # block inputs are ReLU outputs
    x[:, 0] = 1.5 * torch.tensor(on, dtype=torch.float)[:, None, None]  # channel 0's average decides
    x = x.contiguous(memory_format=torch.channels_last)
    got, expected, plan = run_both(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, decision = block(x)
    assert decision.hard.amax(dim=(1, 2, 3)).tolist() == [float(o) for o in on]
    per_image = plan.geometry(x.shape).dense_macs
    assert plan.executed_macs == sum(on) * per_image
    if not any(on) and block.downsample is None:
        assert torch.equal(got, x)


def test_executed_macs_of_a_tile_and_its_halo_by_hand():
    """BasicBlock 8 -> 8, stride 1, an 8 x 8 map, tiles of 4, one tile on. conv2 computes the 4 x 4 tile, conv1
    its 6 x 6 window (a halo of 1), each position 9 * 8 * 8 MACs; 4 tiles in all: no padding (counts are padded
    to a multiple of 1/16 of the tiles)."""
    block = tiled_block("basic", 1, 8, 8, 4, 0.25, "random")  # 1 of the 4 tiles
    x = torch.relu(torch.randn(1, 8, 8, 8)).contiguous(memory_format=torch.channels_last)
    _, _, plan = run_both(block, x, **FORCE_TILES)
    per_tile = 9 * 8 * 8 * (6 * 6) + 9 * 8 * 8 * (4 * 4)
    assert plan.executed_macs == per_tile
    assert plan.geometry(x.shape, 4).window == 8  # conv1's input window: 4 + 2 halos of 2


def test_executed_macs_of_a_dense_fallback_and_of_positions():
    block = tiled_block("basic", 1, 8, 8, 2, 1.0)
    x = torch.relu(torch.randn(1, 8, 8, 8)).contiguous(memory_format=torch.channels_last)
    _, _, plan = run_both(block, x)  # every tile on: the tiles with halos would cost more, the block runs densely
    assert plan.executed_macs == 2 * 9 * 8 * 8 * 64
    block = tiled_block("basic", 1, 8, 8, 1, 0.25, "random")  # per position, gathered: exactly the mask's count
    _, _, plan = run_both(block, x, dense_above=1.1, gather_overhead_macs=0, min_gather_width=0)
    with torch.no_grad():
        _, decision = block(x)
    assert plan.executed_macs == pytest.approx(float(decision.conditional()[0]))


@pytest.mark.parametrize("name,tiles,size", [("resnet8", (32, 16, 8), (32, 32)), ("resnet8", (4, 2, 2), (33, 29)),
                                             ("resnet14", (1000, 1000, 1000), (32, 32)),
                                             ("resnet50", (8, 4, 2, 1), (64, 64)), ("resnet50", (8, 4, 7, 1), (57, 71))])
@pytest.mark.parametrize("settings", [{}, FORCE_TILES], ids=["default-choice", "tiles"])
def test_tiled_network_equals_masked_model(name, tiles, size, settings):
    """Masks from the (random) tiled mask units themselves; whole blocks (a side >= the map) among them."""
    torch.manual_seed(0)
    model = create_model(name, gate_layer=MaskUnit, tiles=tiles)
    model = randomise_batchnorm(model).eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        mix_whole_block_decisions(model, x)
        expected, expected_masks = model(x)
        got, masks = SparseEngine(model, backend="torch", **settings)(x)
    assert all(torch.equal(a.hard, b.hard) for a, b in zip(masks, expected_masks))
    fractions = [m.hard.mean().item() for m in masks]
    assert 0 < sum(fractions) / len(fractions) < 1
    assert (got - expected).abs().max() / expected.abs().max() < 1e-4


def mix_whole_block_decisions(model, x):
    """Shifts each whole-block unit's logits so that one image of three is on (randomly initialised units turn
    every block on): the threshold midway between the two largest logits, far from any rounding."""
    def calibrate(unit, inputs):
        if unit.covers(inputs[0].shape[-2:]):
            logits = unit.maskconv.mean_logit(inputs[0]).flatten().sort().values
            unit.maskconv.fc.bias -= (logits[-1] + logits[-2]) / 2

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, MaskUnit)]
    model(x)
    for hook in hooks:
        hook.remove()


def test_the_cuda_kernels_run_the_tile_path_as_the_torch_ops_do():
    """The tile path's gather and scatter through the CUDA kernels, emulated on the CPU, against torch's ops."""
    emulated = EmulatedKernels(kernel_sources()).ops()
    for kind, inplanes, planes, stride in [("basic", 8, 16, 2), ("bottleneck", 16, 4, 1)]:
        block = tiled_block(kind, stride, inplanes, planes, 4, 0.4)
        x = torch.relu(torch.randn(2, inplanes, 16, 16)).contiguous(memory_format=torch.channels_last)
        got, expected, plan = run_both(block, x, **FORCE_TILES)
        plan.ops = emulated
        with torch.no_grad():
            emulated_out, _ = plan(x.clone())
        torch.testing.assert_close(emulated_out, got, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(emulated_out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tiles", [(8, 4, 100, 100), (4, 2, 2, 1), (100, 100, 100, 100)])
@pytest.mark.parametrize("batch", [1, 3])
def test_tiled_convnext_equals_masked_model(tiles, batch):
    """ConvNeXt-atto at 96 px (maps 24, 12, 6, 3): tiles per stage, whole blocks among them (tile 100)."""
    torch.manual_seed(0)
    model = create_model("convnext_atto", gate_layer=MaskUnit, layer_scale=0.5, tiles=tiles).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if batch == 3:
            mix_whole_block_decisions(model, x)
        expected, expected_decisions = model(x)
        got, decisions = SparseEngine(model, backend="torch")(x)
    assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
    assert [d.tile for d in decisions][0] == tiles[0]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
