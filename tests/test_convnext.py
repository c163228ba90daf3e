"""ConvNeXt with spatial gates: the issue's parameter and MAC numbers, timm's and the official layouts load to the
same logits, a block's MACs by hand, all-on equals dense and all-off equals the identity, gradients everywhere."""
import math

import pytest
import torch

from conftest import set_mask_logits
from dynconv import MaskUnit, count_mmac, count_parameters
from dynconv.models import create_model, model_config
from dynconv.models.convnext import ConvNeXtBlock, convnext_checkpoint_filter
from dynconv.utils.checkpoint import load_model_state


@pytest.mark.parametrize("name,params", [("convnext_tiny", 28_589_128),
                                         pytest.param("convnext_small", 50_223_688, marks=pytest.mark.slow),
                                         pytest.param("convnext_base", 88_591_464, marks=pytest.mark.slow)])
def test_parameter_counts(name, params):
    assert count_parameters(create_model(name)) == params


@pytest.mark.parametrize("size,dense,off,on", [
    (64, 364.750848, 16.958556, 366.327900),
    pytest.param(224, 4468.197888, 207.742311, 4487.516775, marks=pytest.mark.slow)])
def test_convnext_tiny_macs(size, dense, off, on):
    x = torch.randn(1, 3, size, size)
    assert count_mmac(create_model("convnext_tiny").eval(), x) == pytest.approx(dense, abs=5e-7)
    sparse = create_model("convnext_tiny", gate_layer=MaskUnit).eval()
    set_mask_logits(sparse, -10.0)
    assert count_mmac(sparse, x) == pytest.approx(off, abs=5e-7)
    set_mask_logits(sparse, 10.0)
    assert count_mmac(sparse, x) == pytest.approx(on, abs=5e-7)


def test_convnext_atto_at_64_macs_by_hand():
    """The README's CIFAR-10 runs at 64x64: stem 16x16 x (40 * 3 * 16 + 40); 2x2 downsampling convs at 8x8, 4x4,
    2x2; blocks (8 C^2 + 55 C) per position, 2/2/6/2 of them at 16x16/8x8/4x4/2x2, C = 40/80/160/320: 44,965,120
    MACs. Gated, every block adds its mask unit's (9 C + 1) per position (438,504); all off leaves stem,
    downsampling and mask units (3,406,824)."""
    x = torch.randn(2, 3, 64, 64)
    assert count_mmac(create_model("convnext_atto", num_classes=10).eval(), x) == pytest.approx(44.965120, abs=5e-7)
    sparse = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=10).eval()
    for logit, expected in ((-10.0, 3.406824), (10.0, 45.403624)):
        set_mask_logits(sparse, logit)
        assert count_mmac(sparse, x) == pytest.approx(expected, abs=5e-7)


def test_one_block_macs_by_hand():
    torch.manual_seed(0)
    c, h, w = 8, 5, 6
    block = ConvNeXtBlock(c, gate_layer=MaskUnit).eval()
    per_position = 55 * c + 8 * c * c  # dwconv 49 C + C bias, fc1 4 C^2 + 4 C, fc2 4 C^2 + C
    assert block.masker.cost.macs == per_position
    _, decision = block(torch.randn(1, c, h, w))
    active = decision.hard.sum().item()
    assert 0 < active < h * w
    assert float(decision.macs()) == active * per_position + h * w * (9 * c + 1)  # + the mask unit's 3x3 conv


def _official_keys(state_dict):
    """Our (timm) layout renamed to the official facebookresearch/ConvNeXt one."""
    import re

    rules = [(r"^stem\.(\d)\.", r"downsample_layers.0.\1."), (r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1."),
             (r"\.blocks\.(\d+)\.conv_dw\.", r".\1.dwconv."), (r"\.blocks\.(\d+)\.mlp\.fc1\.", r".\1.pwconv1."),
             (r"\.blocks\.(\d+)\.mlp\.fc2\.", r".\1.pwconv2."), (r"\.blocks\.(\d+)\.", r".\1."),
             (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head.")]
    out = {}
    for key, value in state_dict.items():
        for pattern, official in rules:
            key = re.sub(pattern, official, key)
        out[key] = value
    return out


def test_timm_and_official_layouts_give_identical_logits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("convnext_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    for state_dict in (reference.state_dict(), _official_keys(reference.state_dict())):
        ours = create_model("convnext_tiny").eval()
        load_model_state(ours, model_config("convnext_tiny").checkpoint_filter(state_dict, ours), "test")
        with torch.no_grad():
            torch.testing.assert_close(ours(x)[0], reference(x))
    atto = timm.create_model("convnext_atto").eval()  # 1x1-conv MLPs in timm: Linear weights here
    ours = create_model("convnext_atto").eval()
    load_model_state(ours, convnext_checkpoint_filter(atto.state_dict()), "atto")
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], atto(x), rtol=1e-4, atol=1e-5)


def test_gated_blocks_all_on_equal_dense_and_all_off_are_the_identity():
    torch.manual_seed(0)
    dense = create_model("convnext_atto", layer_scale=1.0).eval()
    sparse = create_model("convnext_atto", layer_scale=1.0, gate_layer=MaskUnit).eval()
    load_model_state(sparse, dense.state_dict(), "dense", allow_missing=set(sparse.state_dict()) - set(
        dense.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    set_mask_logits(sparse, 10.0)
    torch.testing.assert_close(sparse(x)[0], dense(x)[0])
    set_mask_logits(sparse, -10.0)
    block = sparse.stages[1].blocks[0]
    y = torch.randn(2, 80, 8, 8)
    assert torch.equal(block(y)[0], y)


def test_every_parameter_gets_a_gradient():
    from dynconv import SparsityCriterion

    model = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=5).train()
    logits, decisions = model(torch.randn(2, 3, 64, 64))
    (logits.logsumexp(1).mean() + SparsityCriterion(0.5, 10)(decisions, 1)[0]).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_the_recipe_schedules_temperature_groups_and_freeze():
    """The budget-aware single-target recipe is convnext's default: temperature 5 / 2.5 / 1 at 0-30-60%, gates at
    the full lr, the backbone at 0.2x and frozen (lr 0) for 5 epochs."""
    from types import SimpleNamespace

    from dynconv.utils.cli import RECIPE_DEFAULTS
    from dynconv.utils.fit import build_setup, gumbel_temperature
    from dynconv.utils.distributed import DistContext
    from dynconv.utils.recipe import set_lr

    args = SimpleNamespace(**dict(RECIPE_DEFAULTS, **model_config("convnext_atto").recipe), budget=0.5, budget_targets=None,
                           model="convnext_atto", amp=False)
    assert [gumbel_temperature(e, args) for e in (0, 35, 36, 71, 72, 119)] == [5.0, 5.0, 2.5, 2.5, 1.0, 1.0]
    model = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=10)
    setup = build_setup(model, args, 10, updates_per_epoch=10, ctx=DistContext())
    lrs = {}
    for epoch in (4, 5, 60):
        set_lr(setup.scheduler, epoch, 0, 10, setup.freeze)
        lrs[epoch] = {g["name"]: g["lr"] for g in setup.optimizer.param_groups}
    assert lrs[4]["backbone"] == 0.0 and lrs[4]["gates"] > 0
    assert lrs[5]["backbone"] == pytest.approx(0.2 * lrs[5]["gates"])
    assert lrs[5]["gates"] == pytest.approx(4e-3 * 5 / 20)  # linear warm-up from 0 over 20 epochs
    cosine = 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * (60 - 20) / (120 - 20)))
    assert lrs[60]["gates"] == pytest.approx(cosine)  # then cosine to the floor


def test_imagenet_cli_takes_a_test_split_and_refuses_bad_resolutions(tmp_path, capsys):
    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), splits=("train", "test"), classes=2, per_class=4, size=64)
    common = ["--model", "convnext_atto", "--data", root, "--workers", "0", "--epochs", "1", "--batchsize", "4",
              "--warmup_epochs", "0", "-s", str(tmp_path / "run")]
    code, _, err = run_entry(main_imagenet.main, common + ["--resolution", "48"], capsys)
    assert code == 2 and "--resolution 48 is not a multiple of 32" in err
    code, out, err = run_entry(main_imagenet.main, common + ["--resolution", "32", "--budget", "0.5", "--freeze",
                                                             "backbone=0"], capsys)
    assert code == 0, err
    assert "* Epoch 1 - Prec@1" in out


@pytest.mark.parametrize("dense_above", [1.1, 0.5], ids=["gathered", "dense-when-over-half"])
@pytest.mark.parametrize("size", [64, 96])
def test_engine_computes_the_gated_model(dense_above, size):
    """The engine's ConvNeXt plan (7x7 gathers, LayerNorm and both Linears on the active rows, scatter-add without
    an activation) against the masked model, with the trained-like masks of randomised gates."""
    from dynconv.sparse.engine import SparseEngine

    torch.manual_seed(0)
    model = create_model("convnext_atto", gate_layer=MaskUnit, layer_scale=0.5).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, expected_decisions = model(x)
        got, decisions = SparseEngine(model, backend="torch", dense_above=dense_above)(x)
    fractions = [d.hard.mean().item() for d in decisions]
    assert 0 < sum(fractions) / len(fractions) < 1
    assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_engine_block_with_nothing_active_is_the_identity():
    from dynconv.sparse.engine import SparseEngine

    set_block = create_model("convnext_atto", gate_layer=MaskUnit).eval()
    set_mask_logits(set_block, -10.0)
    block = set_block.stages[2].blocks[0]
    engine = SparseEngine(torch.nn.Sequential(block).eval(), backend="torch")
    y = torch.randn(1, 160, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, decision = engine.plans[block](y.clone())
    assert decision.hard.sum() == 0 and torch.equal(out, y)


def test_engine_blocks_with_the_cuda_kernels_emulated_on_the_cpu():
    """Every gated block's plan run with the cupy backend's op table (its kernels compiled for the CPU, see
    tests/cuda_emulation.py) equals the masked block."""
    from cuda_emulation import EmulatedKernels
    from dynconv.sparse.cuda_kernels import kernel_sources
    from dynconv.sparse.plans import EngineSettings
    from dynconv.sparse.plans.convnext import ConvNeXtBlockPlan

    torch.manual_seed(0)
    model = create_model("convnext_atto", gate_layer=MaskUnit, layer_scale=0.5).eval()
    emulated = EmulatedKernels(kernel_sources()).ops()
    x = model.stem(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        for stage in model.stages:
            x = stage.downsample(x).contiguous(memory_format=torch.channels_last)
            for block in stage.blocks:
                expected, decision = block(x)
                got, _ = ConvNeXtBlockPlan(block, emulated, EngineSettings(dense_above=1.1))(x.clone())
                assert 0 < decision.hard.mean() < 1
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                x = expected


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "addmm"])
def test_row_linear_is_the_linear_layer(onednn, monkeypatch):
    """The engine's Linear on rows, with oneDNN's prepared weight and without it, against nn.Linear."""
    from dynconv.sparse import linear
    from dynconv.sparse.ops import TORCH_OPS

    monkeypatch.setattr(linear, "ONEDNN_MIN_MACS", 0)  # this small product through oneDNN too
    if not onednn:
        monkeypatch.setattr(linear, "_onednn_weight", lambda weight: None)
    layer, rows = torch.nn.Linear(24, 40), torch.randn(13, 24)
    row_linear = linear.RowLinear(layer.weight, layer.bias)
    assert (row_linear.packed is not None) == (onednn and torch.backends.mkldnn.is_available())
    with torch.no_grad():
        torch.testing.assert_close(TORCH_OPS.linear(rows, row_linear, False), layer(rows))
        torch.testing.assert_close(TORCH_OPS.linear(rows, row_linear, True), layer(rows).relu())
        assert TORCH_OPS.linear(rows[:0], row_linear, False).shape == (0, 40)


def test_checkpoints_of_another_family_or_class_count_are_refused_in_one_line(tmp_path, capsys):
    """A ConvNeXt file for a ResNet and the reverse name the keys that do not fit; a 1000-class ConvNeXt file for
    -e on 2 classes says so (exit 2 each), and --pretrained takes it with a new classifier."""
    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), splits=("train", "val"), classes=2, per_class=2, size=32)
    convnext, resnet = str(tmp_path / "convnext_atto.pth"), str(tmp_path / "resnet18.pth")
    torch.save(create_model("convnext_atto").state_dict(), convnext)  # timm's layout, 1000 classes
    torch.save({"model": create_model("resnet18", num_classes=2).state_dict()}, resnet)
    common = ["--data", root, "--workers", "0", "--resolution", "32"]
    for model, path, missing, unexpected in (("resnet18", convnext, "bn1.bias", "head.fc.bias"),
                                             ("convnext_atto", resnet, "head.fc.bias", "bn1.bias")):
        code, _, err = run_entry(main_imagenet.main, common + ["--model", model, "-r", path, "-e"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"missing keys {missing}" in err and f"unexpected keys {unexpected}" in err
    code, _, err = run_entry(main_imagenet.main, common + ["--model", "convnext_atto", "-r", convnext, "-e"], capsys)
    assert code == 2 and "its classifier has 1000 classes and the data 2" in err
    code, out, err = run_entry(main_imagenet.main, common + [
        "--model", "convnext_atto", "--pretrained", convnext, "--epochs", "1", "--warmup_epochs", "0", "--batchsize",
        "2", "-s", str(tmp_path / "run")], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_cli_trains_with_ema_resumes_evaluates_and_plots(tmp_path, capsys):
    """The ConvNeXt recipe (AdamW, cosine, mixup/cutmix, EMA) on a tiny image folder: 2 epochs stopped by a Ctrl-C
    after the first and resumed with the same command, then -e (raw and EMA, with the engine) and ponder plots."""
    import os
    import signal

    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder
    from dynconv.utils.checkpoint import load_checkpoint
    from dynconv.utils.fit import Trainer

    root = make_image_folder(str(tmp_path / "data"), splits=("train", "val"), classes=2, per_class=4, size=32)
    run_dir = str(tmp_path / "run")
    command = ["--model", "convnext_atto", "--budget", "0.5", "--data", root, "--workers", "0", "--resolution", "32",
               "--epochs", "2", "--warmup_epochs", "1", "--freeze", "backbone=0", "--batchsize", "4", "--model_ema",
               "--model_ema_decay", "0.9", "-s", run_dir]
    save = Trainer.save_epoch

    def save_then_ctrl_c(trainer, epoch, *args):
        save(trainer, epoch, *args)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_epoch", save_then_ctrl_c)
        assert run_entry(main_imagenet.main, command, capsys)[0] == 130
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["epoch"] == 1
    code, out, err = run_entry(main_imagenet.main, command + ["-r", run_dir], capsys)
    assert code == 0, err
    assert "* Epoch 2 - Prec@1" in out and "* Epoch 1 - Prec@1" not in out
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["epoch"] == 2
    assert {"checkpoint_best.pth", "checkpoint_ema.pth", "checkpoint_best_ema.pth"} <= set(os.listdir(run_dir))
    common = ["--data", root, "--workers", "0", "--resolution", "32", "-e"]
    for name in ("checkpoint_best.pth", "checkpoint_best_ema.pth"):
        code, out, err = run_entry(main_imagenet.main, common + ["-r", os.path.join(run_dir, name), "--fast"], capsys)
        assert code == 0, err
        assert "Prec@1" in out and "engine" in out.lower()
    plots = str(tmp_path / "ponder")
    code, _, err = run_entry(main_imagenet.main, common + ["-r", run_dir, "--plot_ponder", "--plot_only",
                                                           "--plot_count", "2", "--plot_dir", plots], capsys)
    assert code == 0, err
    assert len([f for f in os.listdir(plots) if f.endswith(".png")]) == 2


def test_budget_aware_papers_sparse_checkpoint_evaluates(tmp_path, capsys):
    """The budget-aware code's checkpoint: the official layout plus stages.i.j.masker.maskconv.{conv,fc}.*, in the
    DynConv dict (state_dict, optimizer, epoch, best_prec1), with DataParallel's 'module.' prefix; -e gives the
    same Prec@1 as our own copy of the weights, and the masker keys arrive in the gates."""
    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder

    torch.manual_seed(0)
    root = make_image_folder(str(tmp_path / "data"), splits=("train", "val"), classes=2, per_class=4, size=32)
    model = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=2)
    official = {f"module.{k}": v for k, v in _official_keys(model.state_dict()).items()}
    assert "module.stages.1.0.masker.maskconv.fc.weight" in official and "module.stages.1.0.pwconv1.weight" in official
    path = str(tmp_path / "budget_aware.pth")
    torch.save({"state_dict": official, "optimizer": {}, "epoch": 3, "best_prec1": 50.0}, path)
    loaded = create_model("convnext_atto", gate_layer=MaskUnit, num_classes=2)
    load_model_state(loaded, convnext_checkpoint_filter(official, loaded), path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    code, out, err = run_entry(main_imagenet.main, ["--model", "convnext_atto", "--budget", "0.5", "-r", path, "-e",
                                                    "--data", root, "--workers", "0", "--resolution", "32"], capsys)
    assert code == 0, err
    assert "Prec@1" in out
