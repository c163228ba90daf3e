"""The sparse inference engine computes the masked-dense model's function, skipping masked positions."""
import csv
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_cifar
from conftest import run_command
from dynconv import MaskUnit
from dynconv.sparse.engine import SparseEngine
from dynconv.sparse.masks import SyntheticMaskUnit, install_synthetic_masks, synthetic_mask
from dynconv.models import create_model
from dynconv.models.resnet import BasicBlock, Bottleneck, conv1x1
from dynconv.utils.errors import run_cli


def randomise_batchnorm(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
    return module


def make_block(kind, stride, inplanes, planes):
    block_type = BasicBlock if kind == "basic" else Bottleneck
    downsample = None
    if stride != 1 or inplanes != planes * block_type.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block_type.expansion, stride),
                                   nn.BatchNorm2d(planes * block_type.expansion))
    return block_type(inplanes, planes, stride, downsample, gate_layer=MaskUnit)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "conv2d"])
def test_folded_conv_is_conv_then_batchnorm(onednn, monkeypatch):
    """A folded conv over whole maps (oneDNN's prepacked weight, one per one-image input shape, or F.conv2d) equals
    the conv followed by its BatchNorm in eval mode, at its own padding and at padding 0, for one and three images."""
    from dynconv.sparse import layout

    small = layout.fold_conv_bn(nn.Conv2d(6, 10, 3), nn.BatchNorm2d(10).eval())
    small.conv(torch.randn(1, 6, 5, 5))
    assert not small.packed  # below PACKED_CONV_MIN_WEIGHT: F.conv2d
    monkeypatch.setattr(layout, "PACKED_CONV_MIN_WEIGHT", 0)
    if not onednn:
        monkeypatch.setattr(layout, "_onednn_conv_weight", lambda *args: None)
    conv, bn = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=False), randomise_batchnorm(nn.BatchNorm2d(10)).eval()
    folded = layout.fold_conv_bn(conv, bn)
    with torch.no_grad():
        for shape in [(1, 6, 9, 7), (3, 6, 8, 8)]:
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(folded.conv(x), bn(conv(x)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(folded.conv(x, relu=True, padding=0),
                                       bn(F.conv2d(x, conv.weight, None, 2, 0)).relu(), rtol=1e-4, atol=1e-5)
    packed = [w for w in folded.packed.values() if w is not None]  # one image only: (1, 6, 9, 7) at both paddings
    assert len(folded.packed) == 2 and len(packed) == (2 if onednn and torch.backends.mkldnn.is_available() else 0)


MASKS = [("all_on", "random", 1.0), ("all_off", "random", 0.0), ("random", "random", 0.4),
         ("clustered", "clustered", 0.3)]


@pytest.mark.parametrize("kind,inplanes,planes", [("basic", 8, 8), ("basic", 8, 16), ("bottleneck", 16, 4),
                                                  ("bottleneck", 8, 4)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch,size", [(1, (9, 7)), (3, (8, 11))])
@pytest.mark.parametrize("name,mask_kind,density", MASKS)
@pytest.mark.parametrize("dense_above", [1.1, 0.5, -1.0], ids=["gathered", "mixed", "dense-path"])
def test_block_equals_masked_dense(kind, inplanes, planes, stride, batch, size, name, mask_kind, density, dense_above):
    """dense_above 0.5: conv1 everywhere (the dilated masks cover more than half the map) and the rest gathered."""
    torch.manual_seed(1)
    block = randomise_batchnorm(make_block(kind, stride, inplanes, planes)).eval()
    block.masker = SyntheticMaskUnit(block.masker, density, mask_kind, seed=3)
    block = block.to(memory_format=torch.channels_last)
    x = torch.relu(torch.randn(batch, inplanes, *size)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, expected_mask = block(x)
        engine = SparseEngine(nn.Sequential(block).eval(), backend="torch", dense_above=dense_above,
                              gather_overhead_macs=0, min_gather_width=0)
        got, mask = engine.plans[block](x.clone())
    assert torch.equal(mask.hard, expected_mask.hard)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if density == 0.0 and block.downsample is None:
        assert torch.equal(got, x)  # every position skipped: the identity, untouched


@pytest.mark.parametrize("kind,inplanes,planes", [("basic", 8, 8), ("bottleneck", 16, 4)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tile", [1, 2, 3])
@pytest.mark.parametrize("mask_kind,density", [("random", 0.2), ("clustered", 0.4)])
def test_unset_buffer_rows_are_never_read(kind, inplanes, planes, stride, tile, mask_kind, density, monkeypatch):
    """conv1's buffer holds its rows at the dilated positions and leaves the others unset: the next 3x3 conv
    reads only dilated positions and the zero row. With every other row NaN the block still equals the model."""
    from dynconv.sparse.plans.resnet import ResNetBlockPlan

    real_buffer = ResNetBlockPlan._buffer
    poisoned = []

    def poisoned_buffer(self, map_rows, idx, num_rows):
        buffer = real_buffer(self, map_rows, idx, num_rows)
        unset = torch.ones(num_rows, dtype=torch.bool)
        unset[idx] = False
        buffer[:num_rows][unset] = float("nan")
        poisoned.append(int(unset.sum()))
        return buffer

    monkeypatch.setattr(ResNetBlockPlan, "_buffer", poisoned_buffer)
    torch.manual_seed(1)
    block = randomise_batchnorm(make_block(kind, stride, inplanes, planes)).eval()
    block.masker.tile = tile
    block.masker = SyntheticMaskUnit(block.masker, density, mask_kind, seed=3).to(memory_format=torch.channels_last)
    block = block.to(memory_format=torch.channels_last)
    x = torch.relu(torch.randn(2, inplanes, 13, 11)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, _ = block(x)
        engine = SparseEngine(nn.Sequential(block).eval(), backend="torch", dense_above=1.1,
                              gather_overhead_macs=0, min_gather_width=0)
        got, _ = engine.plans[block](x.clone())
    assert poisoned and min(poisoned) > 0  # the gathered path ran, with rows left unset
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,size", [("resnet8", (32, 32)), ("resnet8", (33, 29)), ("resnet50", (64, 64)),
                                       ("resnet50", (57, 71))])
@pytest.mark.parametrize("choice", [{}, dict(gather_overhead_macs=0, min_gather_width=0)],
                         ids=["default-choice", "gather-wherever-sparse"])
def test_whole_network_equals_masked_dense(name, size, choice):
    """Masks from the (random) mask units themselves, as in a trained model. With the default dense/gathered
    choice small inputs run mostly densely; the second engine gathers wherever a mask is below 90%."""
    torch.manual_seed(0)
    model = randomise_batchnorm(create_model(name, gate_layer=MaskUnit)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, expected_masks = model(x)
        got, masks = SparseEngine(model, backend="torch", **choice)(x)
    fractions = [m.hard.mean().item() for m in masks]
    assert 0 < sum(fractions) / len(fractions) < 1  # really sparse, not trivially all on or off
    assert all(torch.equal(a.hard, b.hard) for a, b in zip(masks, expected_masks))
    relative = (got - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_bad_models_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="eval mode"):
        SparseEngine(create_model("resnet8", gate_layer=MaskUnit).train())
    with pytest.raises(ValueError, match="this one is dense"):
        SparseEngine(create_model("resnet8").eval())
    with pytest.raises(ValueError, match="unknown engine setting.*dense_above"):
        SparseEngine(create_model("resnet8", gate_layer=MaskUnit).eval(), dense_abov=0.5)
    engine = SparseEngine(create_model("resnet8", gate_layer=MaskUnit).eval(), min_gather_width=0)
    settings = engine.settings
    assert (settings.min_gather_width, settings.dense_above, settings.tile_path) == (0, 0.9, False)

    class OtherBlock(BasicBlock):
        pass

    model = create_model("resnet8", gate_layer=MaskUnit).eval()
    model.layer2[0].__class__ = OtherBlock
    with pytest.raises(ValueError, match="unsupported block type OtherBlock"):
        SparseEngine(model)
    with pytest.raises(ValueError, match="cupy backend needs CUDA tensors"):
        SparseEngine(create_model("resnet8", gate_layer=MaskUnit).eval(), backend="cupy")


def test_synthetic_masks_have_the_requested_density_and_cluster():
    clustered = synthetic_mask(2, 28, 28, 0.3, "clustered", seed=0)
    random = synthetic_mask(2, 28, 28, 0.3, "random", seed=0)
    assert clustered.sum().item() == random.sum().item() == 2 * round(0.3 * 28 * 28)
    assert torch.equal(clustered, synthetic_mask(2, 28, 28, 0.3, "clustered", seed=0))  # deterministic

    def dilated_fraction(m):
        return torch.nn.functional.max_pool2d(m, 3, 1, 1).mean().item()

    assert dilated_fraction(clustered) < 0.5 < dilated_fraction(random)  # blobs dilate little, pixels a lot


def test_fast_evaluation_gives_the_same_prec1(tiny_cifar, tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise_batchnorm(create_model("resnet8", gate_layer=MaskUnit, num_classes=3))
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    args = ["--model", "resnet8", "--budget", "0.5", "--data", tiny_cifar, "--workers", "0", "-r",
            str(tmp_path / "checkpoint.pth"), "-e"]
    outputs = []
    for extra in ([], ["--fast", "--backend", "torch"]):
        try:
            run_cli(lambda: main_cifar.main(args + extra))
        except SystemExit as e:
            assert e.code == 0
        outputs.append(capsys.readouterr().out)
    plain, fast = outputs
    line = [x for x in plain.splitlines() if "Prec@1" in x][0]
    assert line in fast.splitlines() and "warning" not in fast
    assert "* Images/s: masked-dense" in fast and "sparse engine (torch)" in fast


@pytest.mark.slow
def test_speed_benchmark_runs_end_to_end(tmp_path):
    out_csv, out_png = tmp_path / "speed.csv", tmp_path / "speed.png"
    result = run_command("dynconv.benchmarks.speedtest", "--models", "resnet8", "resnet50", "--batch-sizes", "1",
                         "--densities", "0.3", "1.0", "--masks", "clustered", "random", "--resolution", "40", "--runs",
                         "1", "--warmup", "0", "--csv", str(out_csv), "--plot", str(out_png))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert set(rows[0]) >= {"model", "batch", "density", "masks", "dense_ms", "masked_ms", "engine_ms",
                            "ideal_speedup", "speedup", "efficiency"}
    # MMac against the reference numbers: at 40x40 every resnet8 map is (40/32)^2 times its 32x32 size, so the
    # dense count is 1.5625 x 12.500992 and the all-on count (density 1.0) 1.5625 x 12.705088 (mask units included)
    resnet8 = [r for r in rows if r["model"] == "resnet8"]
    assert all(float(r["dense_mmac"]) == pytest.approx(1.5625 * 12.500992, abs=1e-3) for r in resnet8)
    full = [r for r in resnet8 if float(r["density"]) == 1.0]
    assert full and all(float(r["sparse_mmac"]) == pytest.approx(1.5625 * 12.705088, abs=1e-3) for r in full)
    assert all(1.5625 * 0.908608 < float(r["sparse_mmac"]) < 1.5625 * 12.705088 for r in resnet8
               if float(r["density"]) == 0.3)
    assert os.path.getsize(out_png) > 0


def test_speed_benchmark_measures_convnext(tmp_path):
    """speedtest.py on ConvNeXt-T at 64x64: the MMac columns are the issue's numbers (dense 364.750848, every
    position on 366.327900), between them the ideal speedup, and the engine was timed."""
    out_csv = tmp_path / "speed.csv"
    result = run_command("dynconv.benchmarks.speedtest", "--models", "convnext_tiny", "--batch-sizes", "1",
                         "--densities", "0.3", "1.0", "--resolution", "64", "--runs", "1", "--warmup", "0", "--csv",
                         str(out_csv))
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out_csv) as f:
        rows = {float(r["density"]): r for r in csv.DictReader(f)}
    assert all(float(r["dense_mmac"]) == pytest.approx(364.750848, abs=1e-3) for r in rows.values())
    assert float(rows[1.0]["sparse_mmac"]) == pytest.approx(366.327900, abs=1e-3)
    assert 16.958556 < float(rows[0.3]["sparse_mmac"]) < 366.327900
    assert float(rows[0.3]["ideal_speedup"]) > 2 and float(rows[0.3]["engine_ms"]) > 0


def test_a_gap_between_the_engine_and_the_masked_model_is_counted_in_images(capsys):
    from dynconv.utils.training import print_eval
    metrics = {"prec1": 50.0, "mmac": 1.0, "images_per_s": 20.0, "reference_images_per_s": 10.0, "backend": "torch",
               "reference_prec1": 50.2, "evaluated_images": 1000}
    print_eval(1, metrics)
    assert "differs from the engine's by 2 images net" in capsys.readouterr().out
    print_eval(1, {**metrics, "reference_prec1": 50.0})
    assert "warning" not in capsys.readouterr().out


def test_per_stage_rows_by_hand():
    """speedtest --per-stage's rows for ResNet-8 (one block per stage, 32x32) with every position on. Dense MACs
    by hand: stage 1 two 3x3 16 -> 16 convs on 32x32, 2 * 16 * 16 * 9 * 1024 = 4,718,592; stage 2 a 3x3 16 -> 32
    and a 3x3 32 -> 32 on 16x16 and the 1x1 16 -> 32 downsample, 1,179,648 + 2,359,296 + 131,072 = 3,670,016.
    Sparse: the same plus the mask unit's (9 C + 1) per output position, 1024 * 145 and 256 * 145."""
    from dynconv.benchmarks.speedtest import build_models
    from dynconv.benchmarks.stages import stage_rows

    dense, sparse = build_models("resnet8", 10, torch.device("cpu"))
    install_synthetic_masks(sparse, 1.0)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    engine = SparseEngine(sparse)
    plans = {block: stand_in.plan for block, stand_in in engine.stand_ins.items()}
    rows = stage_rows(dense, sparse, engine, images, runs=2, warmup=1)
    assert [(r["stage"], r["blocks"]) for r in rows] == [("layer1", 1), ("layer2", 1), ("layer3", 1)]
    assert (rows[0]["dense_mmac"], rows[0]["sparse_mmac"]) == (4.718592, 4.867072)
    assert (rows[1]["dense_mmac"], rows[1]["sparse_mmac"]) == (3.670016, 3.707136)
    assert rows[0]["ideal_speedup"] == round(4718592 / 4867072, 3)
    for r in rows:
        assert r["dense_ms"] > 0 and r["engine_ms"] > 0
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"], abs=2e-3)
    assert {block: stand_in.plan for block, stand_in in engine.stand_ins.items()} == plans  # put back


def test_speedtest_prints_a_line_per_stage():
    done = run_command("dynconv.benchmarks.speedtest", "--models", "resnet8", "--batch-sizes", "1", "--densities",
                       "0.5", "--runs", "1", "--warmup", "0", "--per-stage")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("# per stage"))) + 2:]
    assert [line.split()[3] for line in table] == ["layer1", "layer2", "layer3"]
    assert all(len(line) <= 120 for line in lines)


def test_convs_outside_the_blocks_run_as_the_plans_dense_convs():
    """The stem (BatchNorm folded) and ConvNeXt's downsampling convs run through FoldedConv.conv in the engine's
    copy; the model keeps its own layers, and the engine equals the model."""
    from dynconv.sparse.engine import _WholeMapConv

    model = create_model("resnet8", gate_layer=MaskUnit).eval()
    engine = SparseEngine(model)
    assert isinstance(engine.network.conv1, _WholeMapConv) and isinstance(engine.network.bn1, nn.Identity)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.bn1, nn.BatchNorm2d)
    convnext = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=10).eval()
    with torch.no_grad():
        for p in convnext.parameters():  # layer scale 1e-6 would hide the blocks
            p.normal_(0, 0.1)
    engine = SparseEngine(convnext)
    assert isinstance(engine.network.stages[1].downsample[1], _WholeMapConv)
    images = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(engine(images)[0], convnext(images)[0], rtol=1e-4, atol=1e-4)
