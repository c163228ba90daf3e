"""ImageNet ResNets (reference MAC/parameter numbers, torchvision compatibility) and main_imagenet.py."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import main_imagenet
from conftest import ROOT, run_entry, set_mask_logits
from dynconv import MaskUnit, count_mmac, count_parameters
from dynconv.models import create_model
from synthetic import make_food101, make_image_folder

pytestmark = pytest.mark.slow

REFERENCE = {  # name: dense MMac, params, sparse all-on MMac, all-off MMac, sparse params
    "resnet18": (1813.561344, 11689512, 1819.553162, 143.273354, None),
    "resnet50": (4087.136256, 25557032, 4128.244267, 518.783531, 25688264),
    "resnet101": (7799.357440, 44549160, 7871.176495, 549.494575, 44854506),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_macs_and_parameters(name):
    dense_mmac, params, on, off, sparse_params = REFERENCE[name]
    x = torch.randn(1, 3, 224, 224)
    dense = create_model(name).eval()
    assert count_mmac(dense, x) == pytest.approx(dense_mmac, abs=5e-7)
    assert count_parameters(dense) == params
    sparse = create_model(name, gate_layer=MaskUnit).eval()
    set_mask_logits(sparse, 10.0)
    assert count_mmac(sparse, x) == pytest.approx(on, abs=5e-7)
    set_mask_logits(sparse, -10.0)
    assert count_mmac(sparse, x) == pytest.approx(off, abs=5e-7)
    if sparse_params:
        assert count_parameters(sparse) == sparse_params


def test_torchvision_resnet50_weights_load_unchanged():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    ours = create_model("resnet50").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], reference(x), rtol=1e-4, atol=1e-5)
    sparse_keys = set(create_model("resnet50", gate_layer=MaskUnit).state_dict())
    assert sparse_keys - set(reference.state_dict()) == {
        f"layer{i}.{j}.masker.maskconv.{m}.{p}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for j in range(n)
        for m in ("conv", "fc") for p in ("weight", "bias")}


# ---- the CLI on a tiny synthetic "ImageNet" (32x32 crops) ----

COMMON = ["--model", "resnet18", "--resolution", "32", "--batchsize", "4", "--workers", "0"]


def cli(argv, capsys=None):
    return run_entry(main_imagenet.main, argv, capsys)


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("tiny_imagenet")), splits=("train", "val"),
                             classes=3, per_class=6, size=40)


@pytest.fixture(scope="module")
def imagenet_run(tiny_imagenet, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("imagenet_run"))
    code = 0
    try:
        main_imagenet.main(COMMON + ["--budget", "0.5", "--data", tiny_imagenet, "--epochs", "1", "-s", run_dir])
    except SystemExit as e:
        code = e.code
    assert code == 0
    return run_dir


def test_train_and_evaluate_prints_prec1_prec5_and_macs(tiny_imagenet, imagenet_run, capsys):
    code, out, _ = cli(COMMON + ["--budget", "0.5", "--dataset-root", tiny_imagenet, "-r", imagenet_run, "-e"],
                       capsys)
    assert code == 0
    assert re.search(r"^\* Epoch 1 - Prec@1 \d+\.\d{3}$", out, re.M)
    assert re.search(r"^\* Epoch 1 - Prec@5 100\.000$", out, re.M)  # 3 classes: top-5 always hits
    assert re.search(r"^\* FLOPS \(multiply-accumulates, MACs\) per image:  \d+\.\d{6} MMac$", out, re.M)


def test_class_subset_and_classifier_size(tiny_imagenet, tmp_path, capsys):
    code, out, _ = cli(COMMON + ["--budget", "-1", "--data", tiny_imagenet, "--classes", "class0", "class2",
                                 "--epochs", "1", "-s", str(tmp_path)], capsys)
    assert code == 0
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["state_dict"]
    assert state["fc.weight"].shape == (2, 512)


def test_food101_by_name_with_a_class_subset(tmp_path, capsys):
    root = make_food101(str(tmp_path / "food"))
    code, out, err = cli(COMMON + ["--model", "resnet50", "--budget", "0.5", "--dataset", "food101", "--data", root,
                                   "--classes", "2", "--epochs", "1", "-s", str(tmp_path / "run")], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert state["fc.weight"].shape == (2, 2048)


def test_pretrained_from_a_local_torchvision_file(tiny_imagenet, tmp_path, capsys):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    code, _, err = cli(COMMON + ["--budget", "0.5", "--data", tiny_imagenet, "--pretrained",
                                 str(tmp_path / "resnet18.pth"), "--epochs", "1", "--lr", "0",
                                 "-s", str(tmp_path / "run")], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["state_dict"]
    torch.testing.assert_close(state["layer3.1.conv2.weight"], reference.state_dict()["layer3.1.conv2.weight"])
    assert state["fc.weight"].shape == (3, 512)  # 3 classes: a fresh classifier


def _bad_root_without_val(tmp_path):
    return make_image_folder(str(tmp_path / "noval"), splits=("train",), classes=2, per_class=2)


def _bad_root_with_empty_class(tmp_path):
    root = make_image_folder(str(tmp_path / "empty"), splits=("train", "val"), classes=2, per_class=2)
    os.makedirs(os.path.join(root, "train", "class9"))
    os.makedirs(os.path.join(root, "val", "class9"))
    return root


def _bad_root_with_unreadable_image(tmp_path):
    root = make_image_folder(str(tmp_path / "broken"), splits=("train", "val"), classes=3, per_class=2)
    with open(os.path.join(root, "val", "class1", "0001.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    return root


@pytest.mark.parametrize("make_root,extra,message", [
    (_bad_root_without_val, [], "needs train/ and val/ (or test/) folders"),
    (_bad_root_with_empty_class, [], "class9"),
    (_bad_root_with_unreadable_image, ["-e", "-r", "RUN"], "cannot read image"),
    (None, ["-e", "-r", "RUN", "--model", "resnet34"], "--model resnet34 contradicts the checkpoint"),
    (None, ["--pretrained", "/nonexistent/weights.pth"], "does not exist"),
    (None, ["--model", "resnet50", "--pretrained"], "not cached"),
])
def test_bad_input(make_root, extra, message, tiny_imagenet, imagenet_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty weights cache
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # and certainly no download
    root = make_root(tmp_path) if make_root else tiny_imagenet
    before = sorted(os.listdir(imagenet_run))
    extra = [imagenet_run if a == "RUN" else a for a in extra]
    code, _, err = cli(COMMON + ["--budget", "0.5", "--data", root, "--epochs", "1", "-s", str(tmp_path / "out")]
                       + extra, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(imagenet_run)) == before  # nothing saved was touched
    if make_root is _bad_root_with_unreadable_image:
        assert os.path.join("class1", "0001.jpg") in err  # the file is named


def _torchrun(args, cwd):
    """Two CPU processes of one thread each (two cores); a crash prints each thread's Python stack."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_imagenet.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _failure(result):
    """The workers' own first lines and torchrun's summary: a failed worker's cause is at the start."""
    return result.stderr[:4000] + "\n[...]\n" + result.stderr[-1500:]


def test_torchrun_two_processes_match_one_process(tiny_imagenet, tmp_path, capsys):
    """Two gloo processes train (one set of checkpoint files) and evaluate the whole validation set once:
    the same Prec@1 and MMac as a single process on the same checkpoint."""
    run_dir = str(tmp_path / "ddp")
    result = _torchrun(COMMON + ["--budget", "0.5", "--data", tiny_imagenet, "--epochs", "1", "-s", run_dir], ROOT)
    assert result.returncode == 0, _failure(result)
    assert result.stdout.count("* Epoch 1 - Prec@1") == 1  # only rank 0 prints
    assert sorted(f for f in os.listdir(run_dir) if f.endswith(".pth")) == ["checkpoint.pth", "checkpoint_best.pth"]
    evaluated = _torchrun(COMMON + ["--budget", "0.5", "--data", tiny_imagenet, "-r", run_dir, "-e"], ROOT)
    assert evaluated.returncode == 0, _failure(evaluated)
    code, single, _ = cli(COMMON + ["--budget", "0.5", "--data", tiny_imagenet, "-r", run_dir, "-e"], capsys)
    assert code == 0
    lines = [line for line in single.splitlines() if line.startswith("*")]
    assert lines == [line for line in evaluated.stdout.splitlines() if line.startswith("*")]
    # and the epoch line printed while training equals the evaluation of the saved checkpoint
    assert re.search(r"\* Epoch 1 - Prec@1 (\S+)", result.stdout).group(1) == re.search(
        r"\* Epoch 1 - Prec@1 (\S+)", single).group(1)


@pytest.mark.slow
def test_torchrun_trains_a_multi_target_model(tiny_imagenet, tmp_path, capsys):
    """Under DDP a step trains one budget, so the other budgets' gates and norms get no gradient (DDP must be
    told); two processes train, and the epoch's per-budget lines equal one process's evaluation of the saved
    checkpoint. (Distributed evaluation itself: test_torchrun_two_processes_match_one_process.)"""
    run_dir = str(tmp_path / "ddp_multi")
    multi = ["--budget_targets", "0.3", "0.6", "--data", tiny_imagenet]
    result = _torchrun(COMMON + multi + ["--epochs", "1", "-s", run_dir], ROOT)
    assert result.returncode == 0, _failure(result)
    assert result.stdout.count("[budget 0.6] * Epoch 1 - Prec@1") == 1
    code, single, _ = cli(COMMON + multi[3:] + ["-r", run_dir, "-e"], capsys)
    assert code == 0
    for budget in ("0.3", "0.6"):
        line = rf"\[budget {budget}\] \* Epoch 1 - Prec@1 (\S+)"
        assert re.search(line, result.stdout).group(1) == re.search(line, single).group(1)


def test_evaluation_takes_the_input_settings_from_the_checkpoint(tiny_imagenet, imagenet_run, capsys):
    """The run was trained at --resolution 32 on tiny_imagenet: -e without those flags evaluates it as trained
    (same MMac as with the flags), says so in one line; a given flag that differs is an override, printed."""
    mmac = r"^\* FLOPS \(multiply-accumulates, MACs\) per image:  (\d+\.\d{6}) MMac$"
    code, given, _ = cli(COMMON + ["--data", tiny_imagenet, "-r", imagenet_run, "-e"], capsys)
    assert code == 0 and "from the checkpoint" not in given
    code, taken, _ = cli(["-r", imagenet_run, "-e", "--workers", "0"], capsys)
    assert code == 0
    line = next(line for line in taken.splitlines() if line.startswith("=> from the checkpoint:"))
    assert "--resolution 32" in line and f"--data {tiny_imagenet}" in line
    assert re.search(mmac, taken, re.M).group(1) == re.search(mmac, given, re.M).group(1)
    code, larger, _ = cli(["-r", imagenet_run, "-e", "--workers", "0", "--resolution", "64"], capsys)
    assert code == 0 and "=> --resolution 64 overrides the checkpoint's 32" in larger
    assert float(re.search(mmac, larger, re.M).group(1)) > 3.5 * float(re.search(mmac, given, re.M).group(1))
