"""The timm training-recipe flags end to end on CIFAR ResNets (tiny synthetic data): AdamW + cosine with warm-up,
EMA, mixup and label smoothing train; the EMA checkpoint evaluates with -e; an interrupted run resumed from its
checkpoint ends exactly where the uninterrupted run does; bad recipe flags are one line and exit 2."""
import json
import os
import signal

import pytest
import torch

import main_cifar
from conftest import run_entry
from dynconv.utils.checkpoint import load_checkpoint

RECIPE = ["--model", "resnet8", "--budget", "0.5", "--batchsize", "8", "--workers", "0", "--opt", "adamw",
          "--lr", "0.002", "--sched", "cosine", "--warmup_epochs", "1", "--model_ema", "--model_ema_decay", "0.9",
          "--mixup", "0.2", "--smoothing", "0.1", "--weight_decay", "0.05"]


def cli(argv, capsys=None):
    return run_entry(main_cifar.main, argv, capsys)


def _logs(run_dir, kind):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tiny_cifar, tmp_path_factory):
    """The same 3-epoch recipe run straight through, and interrupted after its second epoch's checkpoint (a
    Ctrl-C there), then resumed with the same command."""
    from dynconv.utils.fit import Trainer

    straight, resumed = (str(tmp_path_factory.mktemp(n)) for n in ("straight", "resumed"))
    command = RECIPE + ["--data", tiny_cifar, "--epochs", "3"]
    assert cli(command + ["-s", straight])[0] == 0
    save = Trainer.save_epoch

    def save_then_ctrl_c(trainer, epoch, *args):
        save(trainer, epoch, *args)
        if epoch == 1:  # two epochs done: a real SIGINT, caught by the run's handler
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "save_epoch", save_then_ctrl_c)
        assert cli(command + ["-s", resumed])[0] == 130
    assert load_checkpoint(os.path.join(resumed, "checkpoint.pth"))["epoch"] == 2
    assert cli(command + ["-s", resumed, "-r", resumed])[0] == 0
    return straight, resumed


@pytest.mark.slow
def test_recipe_trains_and_writes_the_ema_checkpoints(runs):
    straight, _ = runs
    assert {"checkpoint.pth", "checkpoint_best.pth", "checkpoint_ema.pth", "checkpoint_best_ema.pth"} <= set(
        os.listdir(straight))
    train = _logs(straight, "train")
    # the lr of each epoch's first update; 3 updates per epoch (24 images / 8): warm-up from 0 over updates 0-2,
    # then cosine over the 6 updates after it: update 3 at t = 0 (the peak), update 6 at t = 3 of 6, lr / 2
    assert [r["lr"] for r in train] == pytest.approx([0.0, 0.002, 0.001], abs=1e-9)
    assert len(_logs(straight, "val_ema")) == 3


@pytest.mark.slow
def test_resumed_run_continues_schedule_and_ema_exactly(runs):
    straight, resumed = runs
    a, b = (load_checkpoint(os.path.join(d, "checkpoint.pth")) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 3
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6, msg=key)
    for key in a["state_dict_ema"]:
        torch.testing.assert_close(a["state_dict_ema"][key], b["state_dict_ema"][key], rtol=1e-5, atol=1e-6,
                                   msg=key)
    assert [r["lr"] for r in _logs(straight, "train")] == pytest.approx([r["lr"] for r in _logs(resumed, "train")])


@pytest.mark.slow
def test_ema_checkpoint_evaluates_with_e(runs, tiny_cifar, capsys):
    straight, _ = runs
    code, out, err = cli(["--model", "resnet8", "--budget", "0.5", "--data", tiny_cifar, "--workers", "0", "-e",
                          "-r", os.path.join(straight, "checkpoint_ema.pth")], capsys)
    assert code == 0, err
    last_ema = _logs(straight, "val_ema")[-1]
    assert f"* Epoch 3 - Prec@1 {last_ema['prec1']:.3f}" in out.splitlines()


@pytest.mark.parametrize("argv,message", [
    (["--opt", "lamb"], "invalid choice"),
    (["--sched", "poly"], "invalid choice"),
    (["--sched", "cosine", "--warmup_epochs", "-1"], "--warmup_epochs must not be negative"),
    (["--sched", "cosine", "--warmup_epochs", "2", "--epochs", "2"], "must be less than --epochs"),
    (["--model_ema", "--model_ema_decay", "1.5"], "decay must be in [0, 1)"),
    (["--smoothing", "1.0"], "--smoothing must be in [0, 1)"),
    (["--mixup", "0.2", "--batchsize", "7"], "need an even --batchsize"),
    (["--update_freq", "0"], "--update_freq must be at least 1"),
    (["--lr_scale", "heads=0.5"], "unknown parameter group heads"),
    (["--freeze", "backbone"], "expected KEY=VALUE"),
    (["--model_kwargs", "width=2"], "resnet8 does not take 'width'"),
    (["--fast"], "--fast is an evaluation mode"),
    (["--plot_count", "0"], "--plot_count must be at least 1"),
    (["--save_every_steps", "0"], "must be positive"),
])
def test_bad_recipe_input_is_one_line_and_exit_2(argv, message, tiny_cifar, tmp_path, capsys):
    argv = [str(tmp_path / "none.pth") if a == "CKPT" else a for a in argv]
    code, _, err = cli(["--model", "resnet8", "--budget", "0.5", "--data", tiny_cifar, "--workers", "0",
                        "--epochs", "1", "-s", str(tmp_path / "run")] + argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_frozen_backbone_keeps_its_weights_while_the_gates_train(tiny_cifar, tmp_path):
    """--freeze backbone=1: lr 0 for every non-gate parameter during epoch 1 (SGD without momentum and weight
    decay, so nothing moves them); the gates train at 2x. With accumulation, clipping and drop path on too."""
    run_dir = str(tmp_path / "frozen")
    torch.manual_seed(0)
    command = ["--model", "resnet8", "--budget", "0.5", "--data", tiny_cifar, "--workers", "0", "--batchsize", "4",
               "--update_freq", "2", "--clip_grad", "1.0", "--drop_path", "0.1", "--lr_scale", "gates=2",
               "--freeze", "backbone=1", "--momentum", "0", "--weight_decay", "0", "--no_wd_norm_bias",
               "--epochs", "1", "-s", run_dir]
    assert cli(command)[0] == 0
    trained = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["state_dict"]
    from dynconv import MaskUnit
    from dynconv.models import create_model

    torch.manual_seed(0)  # the run's own seed: the same initial weights
    initial = create_model("resnet8", gate_layer=MaskUnit, num_classes=3, drop_path_rate=0.1).state_dict()
    weights = [k for k in initial if k.endswith("weight") and "bn" not in k and "downsample.1" not in k]
    gates = [k for k in weights if ".masker." in k]
    assert gates and all(not torch.equal(trained[k], initial[k]) for k in gates)
    assert all(torch.equal(trained[k], initial[k]) for k in weights if k not in gates)
