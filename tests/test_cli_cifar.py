"""main_cifar.py end to end on a tiny synthetic image folder, and every bad input the issue lists."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import main_cifar
from conftest import ROOT, run_entry
from dynconv import MaskUnit
from dynconv.models import create_model
from dynconv.utils.checkpoint import load_checkpoint, save_checkpoint

TRAIN = ["--model", "resnet8", "--batchsize", "8", "--workers", "0", "--lr", "0.05"]


def cli(argv, capsys=None):
    return run_entry(main_cifar.main, argv, capsys)


@pytest.fixture(scope="module")
def trained_run(tiny_cifar, tmp_path_factory):
    """A DynConv resnet8 trained for 2 epochs (lr step after epoch 2), then resumed to 3."""
    run_dir = str(tmp_path_factory.mktemp("run") / "sparse05")
    args = TRAIN + ["--budget", "0.5", "--data", tiny_cifar, "-s", run_dir, "-r", run_dir, "--lr_decay", "2"]
    assert cli(args + ["--epochs", "2"])[0] == 0
    first = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    assert cli(args + ["--epochs", "3"])[0] == 0
    return run_dir, first, args


@pytest.mark.slow
def test_training_writes_checkpoints_and_logs(trained_run):
    run_dir, first, _ = trained_run
    assert first["epoch"] == 2
    assert set(first) >= {"state_dict", "optimizer", "epoch", "best_prec1", "args", "version"}  # the lr is a function of the update count: no scheduler state
    assert first["args"]["budget"] == 0.5
    for name in ("checkpoint.pth", "checkpoint_best.pth", "log.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, name))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch_and_lr(trained_run):
    run_dir, first, _ = trained_run
    final = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    assert final["epoch"] == 3
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        train_logs = [json.loads(line) for line in f if '"train"' in line]
    assert [r["step"] for r in train_logs] == [1, 2, 3]  # epoch 3 once, after epochs 1-2 of the first run
    assert [r["lr"] for r in train_logs] == pytest.approx([0.05, 0.05, 0.005])  # decay after epoch 2
    assert set(train_logs[0]) >= {"task_loss", "sparsity_loss", "cost", "block_cost"}


@pytest.mark.slow
def test_evaluate_prints_reference_lines(trained_run, capsys, tmp_path):
    run_dir, _, args = trained_run
    code, out, _ = cli(TRAIN + ["--budget", "0.5", "--data", args[args.index("--data") + 1], "-e",
                               "-r", os.path.join(run_dir, "checkpoint_best.pth"), "--plot_ponder",
                               "--plot_count", "2", "--plot_dir", str(tmp_path / "plots")], capsys)
    assert code == 0
    assert re.search(r"^\* Epoch \d+ - Prec@1 \d+\.\d{3}$", out, re.M)
    mmac = re.search(r"^\* FLOPS \(multiply-accumulates, MACs\) per image:  (\d+\.\d{6}) MMac$", out, re.M)
    assert mmac and 0.908608 <= float(mmac.group(1)) <= 12.705088  # between all-off and all-on resnet8
    pngs = sorted(os.listdir(tmp_path / "plots"))
    assert pngs == ["000.png", "001.png"]  # one figure per image


def test_reference_checkpoint_evaluates(tiny_cifar, tmp_path, capsys):
    """The reference's format: state_dict (here behind a DataParallel 'module.' prefix), optimizer, epoch,
    best_prec1 as a tensor; no scheduler, args or version."""
    model = create_model("resnet8", gate_layer=MaskUnit, num_classes=3)
    path = str(tmp_path / "ref.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                "epoch": 347, "best_prec1": torch.tensor(93.58)}, path)
    code, out, _ = cli(["--model", "resnet8", "--budget", "0.7", "--data", tiny_cifar, "--workers", "0",
                        "-r", path, "-e"], capsys)
    assert code == 0 and "* Epoch 347 - Prec@1 " in out


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


@pytest.fixture(scope="module")
def dense_checkpoint(tiny_cifar, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("dense"))
    assert cli(TRAIN + ["--budget", "-1", "--data", tiny_cifar, "-s", run_dir, "--epochs", "1"])[0] == 0
    return os.path.join(run_dir, "checkpoint_best.pth")


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet9"], "invalid choice"),
    (["--budget", "1.5"], "--budget must be in [0, 1]"),
    (["-e"], "needs a checkpoint"),
    (["-e", "-r", "/nonexistent/checkpoint_best.pth"], "no checkpoint at"),
    (["-e", "-r", "NOT_A_CHECKPOINT"], "is not a readable checkpoint"),
    (["-e", "-r", "DENSE", "--budget", "0.5"], "--budget 0.5 contradicts the checkpoint"),
    (["-e", "-r", "DENSE", "--model", "resnet14"], "--model resnet14 contradicts the checkpoint"),
    (["-e", "-r", "DENSE", "--fast"], "needs a model with gates"),
    (["-e", "-r", "DENSE", "--plot_ponder"], "this model is static"),
    (["-s", "NOT_A_CHECKPOINT/sub"], "cannot write to save directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tiny_cifar, dense_checkpoint, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    argv = [a.replace("NOT_A_CHECKPOINT", str(junk)).replace("DENSE", dense_checkpoint) for a in argv]
    code, out, err = cli(["--data", tiny_cifar, "--workers", "0", "--epochs", "1"] + argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error_from_the_real_command(tmp_path):
    """A data root without CIFAR-10 and no network: one line, exit 2, no traceback (a real process)."""
    result = subprocess.run([sys.executable, "main_cifar.py", "--data", str(tmp_path / "none"), "--epochs", "1",
                             "-s", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "CIFAR-10 is not in" in result.stderr and "--data" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
