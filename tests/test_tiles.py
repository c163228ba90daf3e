"""Tiles for spatial gates (--tiles): one decision per tile, the mask the tiles expanded, MACs by hand, the flag."""
import functools
import math
import os

import pytest
import torch

import main_cifar
from conftest import run_entry, set_mask_logits
from dynconv import MaskUnit, UnitCost, count_mmac
from dynconv.models import create_model
from dynconv.models.base import DynamicNetwork
from dynconv.models.resnet import BasicBlock, Bottleneck
from dynconv.utils.checkpoint import load_checkpoint


def tile_decisions_by_hand(logits, tile):
    """(N, 1, ceil(H/t), ceil(W/t)) 0/1: per tile, whether the mean of its logits on the map is >= 0 (loops)."""
    n, _, h, w = logits.shape
    rows, cols = math.ceil(h / tile), math.ceil(w / tile)
    out = torch.zeros(n, 1, rows, cols)
    for i in range(n):
        for r in range(rows):
            for c in range(cols):
                window = logits[i, 0, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                out[i, 0, r, c] = float(window.mean() >= 0)
    return out


@pytest.mark.parametrize("tile", [1, 2, 4, 8, 100])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size,stride", [(9, 1), (7, 1), (9, 2), (16, 2)])
def test_mask_is_the_tile_decisions_expanded(tile, batch, size, stride):
    torch.manual_seed(tile + batch + size)
    unit = MaskUnit(4, stride=stride, dilate_stride=stride, dilated_cost=UnitCost(1, 1), tile=tile).eval()
    x = torch.randn(batch, 4, size, size)
    logits = unit.maskconv(x)
    decision = unit(x)
    out = (size - 1) // stride + 1
    assert decision.hard.shape == (batch, 1, out, out) and decision.tile == unit.tile == tile
    grid = tile_decisions_by_hand(logits, tile)
    assert torch.equal(decision.hard[:, :, ::tile, ::tile], grid)
    for y in range(out):  # every position carries its tile's decision (the overhanging tiles cropped)
        for x_ in range(out):
            assert torch.equal(decision.hard[:, :, y, x_], grid[:, :, y // tile, x_ // tile])
    if tile >= out:  # whole block: one decision per image
        assert all(decision.hard[i].unique().numel() == 1 for i in range(batch))


def test_tile_one_is_the_per_position_gate():
    """tile 1 (the default): hard = (logits >= 0) in evaluation; in training, one noise draw per position as the
    per-position DynConv unit draws it (logistic noise, sigmoid, threshold 0.5)."""
    unit = MaskUnit(8, stride=2, dilate_stride=1, dilated_cost=UnitCost(1, 1))
    assert unit.tile == 1
    x = torch.randn(3, 8, 11, 11)
    logits = unit.maskconv(x)
    assert torch.equal(unit.eval()(x).hard, (logits >= 0).float())
    unit.train()
    torch.manual_seed(5)
    decision = unit(x)
    torch.manual_seed(5)
    soft = torch.sigmoid(logits + torch.logit(torch.rand_like(logits), eps=1e-8))
    assert torch.equal(decision.soft, soft) and torch.equal(decision.hard, (soft >= 0.5).float())


def test_training_decides_once_per_tile_and_its_gradient_reaches_every_position():
    torch.manual_seed(0)
    unit = MaskUnit(4, tile=4).train()
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    decision = unit(x)
    hard, soft = decision.hard, decision.soft
    assert soft.shape == hard.shape == (2, 1, 10, 10)
    for t in (hard, soft):
        assert torch.equal(t, t[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :10, :10])
    hard.sum().backward()  # straight-through: a tile's gradient spreads over its positions' logits
    assert unit.maskconv.conv.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("value,expected", [(5.0, 1.0), (-5.0, 0.0)])
def test_full_and_empty_tiled_masks(value, expected):
    model = create_model("resnet8", gate_layer=MaskUnit, tiles=(8, 2, 3)).eval()
    set_mask_logits(model, value)
    _, decisions = model(torch.randn(3, 3, 32, 32))
    assert [d.tile for d in decisions] == [8, 2, 3]
    assert all(torch.all(d.hard == expected) for d in decisions)


def test_every_model_with_spatial_gates_takes_tiles_per_stage():
    cifar = create_model("resnet8", gate_layer=MaskUnit, tiles=(4, 2, 1), targets=(0.25, 0.5))
    assert [b.masker.tile for s in cifar.stages for b in s] == [4, 2, 1]  # the per-budget gate
    assert all(g.tile == t for s, t in zip(cifar.stages, (4, 2, 1)) for b in s for g in b.masker.values())
    imagenet = create_model("resnet18", gate_layer=MaskUnit, tiles=(8, 4, 2, 1))
    assert [b.masker.tile for s in imagenet.stages for b in s] == [8, 8, 4, 4, 2, 2, 1, 1]
    convnext = create_model("convnext_atto", gate_layer=MaskUnit, tiles=(8, 4, 2, 1))
    assert [b.masker.tile for s in convnext.stages for b in s.blocks] == [8] * 2 + [4] * 2 + [2] * 6 + [1] * 2
    default = create_model("resnet8", gate_layer=MaskUnit)
    assert all(b.masker.tile == 1 for s in default.stages for b in s)
    with pytest.raises(ValueError, match="one side per stage"):
        create_model("resnet8", gate_layer=MaskUnit, tiles=(2, 2))
    with pytest.raises(ValueError, match="positive"):
        create_model("resnet50", gate_layer=MaskUnit, tiles=(2, 0, 1, 1))


class OneBlock(DynamicNetwork):
    """A network that is one gated block (no stem, no head), for counting its MACs."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward_features(self, x, target=None):
        x, decision = self.block(x, target)
        return x, [decision]

    def forward_head(self, x):
        return x


def fixed_logits(block, logits):
    block.masker.maskconv.forward = lambda x: logits


def test_macs_of_a_tiled_mask_by_hand():
    """BasicBlock 2 -> 2 channels on a 5x5 map, tiles of 2 (a 3x3 tile grid whose last row and column overhang).
    Tile (0, 0): logits 3, -1, -1, 0 (mean 0.25: on); the overhanging corner tile (2, 2) is position (4, 4)
    alone (logit 1: on); every other tile -2 (off).
    Mask: 4 + 1 = 5 positions. Dilated (3x3): rows/cols 0-2 (9) and rows/cols 3-4 (4): 13 positions.
    conv1 and conv2: 3 * 3 * 2 * 2 = 36 MACs per position each; the mask unit's conv: 25 * (9 * 2 + 1) = 475.
    Total: 13 * 36 + 5 * 36 + 475 = 1123 MACs."""
    block = BasicBlock(2, 2, gate_layer=functools.partial(MaskUnit, tile=2)).eval()
    logits = torch.full((1, 1, 5, 5), -2.0)
    logits[0, 0, :2, :2] = torch.tensor([[3.0, -1.0], [-1.0, 0.0]])
    logits[0, 0, 4, 4] = 1.0
    fixed_logits(block, logits)
    model = OneBlock(block)
    _, (decision,) = model(torch.randn(1, 2, 5, 5))
    expected = torch.zeros(5, 5)
    expected[:2, :2] = 1
    expected[4, 4] = 1
    assert torch.equal(decision.hard[0, 0], expected)
    assert decision.dilated.sum() == 13
    assert count_mmac(model, torch.randn(1, 2, 5, 5)) * 1e6 == pytest.approx(1123)


def test_macs_of_a_tiled_strided_bottleneck_by_hand():
    """Bottleneck 4 -> planes 1 (out 4), stride 2, on a 7x7 input: a 4x4 mask, tile 3 (2x2 grid, the second row
    and column overhang by 2). Only tile (1, 1) (mask positions (3, 3) alone) is on: 1 mask position.
    Dilated: mask (3, 3) sits at input (6, 6); its 3x3 window cropped to the 7x7 input: rows/cols 5-6, 4 positions.
    conv1 (1x1, 4 -> 1): 4 MACs per dilated position; conv2 (3x3, 1 -> 1) 9 + conv3 (1x1, 1 -> 4) 4 per mask
    position; downsample (1x1 strided, 4 -> 4) at all 16 output positions: 16 * 16 = 256; mask unit:
    16 * (9 * 4 + 1) = 592. Total: 4 * 4 + 1 * 13 + 256 + 592 = 877 MACs."""
    downsample = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, stride=2, bias=False), torch.nn.BatchNorm2d(4))
    block = Bottleneck(4, 1, stride=2, downsample=downsample, gate_layer=functools.partial(MaskUnit, tile=3)).eval()
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, 3, 3] = 0.5
    fixed_logits(block, logits)
    model = OneBlock(block)
    _, (decision,) = model(torch.randn(1, 4, 7, 7))
    assert decision.hard.sum() == 1 and decision.hard[0, 0, 3, 3] == 1
    assert decision.dilated.shape == (1, 1, 7, 7) and decision.dilated.sum() == 4
    assert count_mmac(model, torch.randn(1, 4, 7, 7)) * 1e6 == pytest.approx(877)


TRAIN = ["--model", "resnet8", "--batchsize", "8", "--workers", "0", "--epochs", "1"]


def cli(argv, capsys):
    return run_entry(main_cifar.main, argv, capsys)


def test_tiled_checkpoint_evaluates_without_repeating_tiles(tiny_cifar, tmp_path, capsys):
    run_dir = str(tmp_path / "tiled")
    code, out, _ = cli(TRAIN + ["--budget", "0.5", "--tiles", "4", "2", "8", "--data", tiny_cifar, "-s", run_dir],
                       capsys)
    assert code == 0 and "tiles 4 2 8" in out
    saved = load_checkpoint(os.path.join(run_dir, "checkpoint_best.pth"))["args"]
    assert tuple(saved["model_kwargs"]["tiles"]) == (4, 2, 8)
    code, out, _ = cli(["-r", run_dir, "-e", "--data", tiny_cifar, "--workers", "0"], capsys)
    assert code == 0 and "DynConv, budget 0.5, tiles 4 2 8" in out
    code, _, err = cli(["-r", run_dir, "-e", "--data", tiny_cifar, "--tiles", "1", "1", "1"], capsys)
    assert code == 2 and "contradicts the checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0.5", "--tiles", "2", "2"], "one side per stage: 3 values (got 2)"),
    (["--budget", "0.5", "--tiles", "2", "0", "1"], "positive integers"),
    (["--budget", "0.5", "--tiles", "-2", "1", "1"], "positive integers"),
    (["--budget", "0.5", "--tiles", "2", "x", "1"], "invalid int value"),
    (["--tiles", "2", "2", "2"], "add --budget or --budget_targets"),
    (["--model", "pedconv_resnet8", "--tiles", "2", "2", "2"], "--tiles does not apply to pedconv_resnet8"),
])
def test_bad_tiles_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code, _, err = cli(TRAIN + argv + ["--data", str(tmp_path / "nodata"), "-s", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_help_shows_tiles(capsys):
    with pytest.raises(SystemExit):
        main_cifar.main(["-h"])
    out = capsys.readouterr().out
    assert "--tiles" in out and "default 1 1 1 1 or 1 1 1" in " ".join(out.split())  # ImageNet and CIFAR
