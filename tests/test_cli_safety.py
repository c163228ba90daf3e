"""The CLI keeps what is saved and says what it does: refused overwrites, SIGTERM/SIGINT mid-epoch checkpoints that
resume to the same result, flags read from the checkpoint, early checks, plain progress lines when redirected."""
import os
import signal
import stat

import pytest
import torch

import main_cifar
from conftest import run_entry
from dynconv.utils.checkpoint import load_checkpoint

TRAIN = ["--model", "resnet8", "--budget", "0.5", "--batchsize", "8", "--workers", "0", "--lr", "0.05",
         "--lr_decay", "1"]


def cli(argv, capsys=None):
    return run_entry(main_cifar.main, argv, capsys)


def test_a_new_run_refuses_a_directory_with_checkpoints_it_did_not_write(tiny_cifar, tmp_path, capsys):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "checkpoint_best.pth").write_bytes(b"a shipped checkpoint")
    code, _, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(shipped)], capsys)
    assert code == 2 and "already holds checkpoint_best.pth" in err and "--overwrite" in err
    assert (shipped / "checkpoint_best.pth").read_bytes() == b"a shipped checkpoint"
    code, _, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(shipped), "-r", str(shipped)],
                       capsys)
    assert code == 2, "a directory without checkpoint.pth cannot be resumed, so -r DIR starts a new run there"
    assert cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(shipped), "--overwrite"], capsys)[0] == 0
    assert load_checkpoint(str(shipped / "checkpoint_best.pth"))["epoch"] == 1


def test_new_runs_go_under_runs_by_default():
    from dynconv.utils.run import default_run_dir

    assert default_run_dir("cifar", "resnet8", 0.5) == os.path.join("runs", "cifar", "resnet8", "sparse05")


@pytest.fixture(scope="module")
def straight_run(tiny_cifar, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    assert cli(TRAIN + ["--data", tiny_cifar, "--epochs", "2", "-s", run_dir])[0] == 0
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_saves_a_checkpoint_that_resumes_to_the_same_result(sig, code, straight_run, tiny_cifar,
                                                                             tmp_path, capsys):
    from dynconv.utils.fit import Trainer

    run_dir = str(tmp_path / "interrupted")
    after_update = Trainer.after_update

    def signal_after_first_update(trainer, epoch, step):
        if (epoch, step) == (0, 1):
            os.kill(os.getpid(), sig)  # what a cluster (SIGTERM) or Ctrl-C (SIGINT) sends
        after_update(trainer, epoch, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "after_update", signal_after_first_update)
        got, out, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "2", "-s", run_dir], capsys)
    assert got == code
    assert f"saved {os.path.join(run_dir, 'checkpoint.pth')} (epoch 1, after batch 1)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    partial = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    assert (partial["epoch"], partial["step"]) == (0, 1)
    code, out, _ = cli(["--data", tiny_cifar, "--workers", "0", "-r", run_dir], capsys)  # flags from the checkpoint
    assert code == 0 and "resuming epoch 1 after batch 1" in out
    expected = load_checkpoint(os.path.join(straight_run, "checkpoint.pth"))["state_dict"]
    final = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["state_dict"]
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_save_every_steps_writes_mid_epoch_checkpoints(tiny_cifar, tmp_path):
    from dynconv.utils.fit import Trainer

    written = []
    write = Trainer._write

    def record(trainer, state, name):
        written.append((name, state["epoch"], state.get("step")))
        write(trainer, state, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_write", record)
        assert cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "--save_every_steps", "1",
                            "-s", str(tmp_path / "run")])[0] == 0
    # 3 updates per epoch: mid-epoch after updates 1 and 2, then the end of the epoch (latest and best)
    assert written == [("checkpoint.pth", 0, 1), ("checkpoint.pth", 0, 2), ("checkpoint.pth", 1, None),
                       ("checkpoint_best.pth", 1, None)]


@pytest.mark.slow
def test_flags_come_from_the_checkpoint_and_contradictions_are_clear(straight_run, tiny_cifar, capsys):
    # --model defaults to resnet32 and --budget to -1: both come from the checkpoint instead
    code, out, _ = cli(["--data", tiny_cifar, "--workers", "0", "-r", straight_run, "-e"], capsys)
    assert code == 0
    assert f"=> evaluating {os.path.join(straight_run, 'checkpoint_best.pth')}" in out
    assert "resnet8 (DynConv, budget 0.5)" in out
    code, _, err = cli(["--data", tiny_cifar, "--workers", "0", "-r", straight_run, "-e", "--budget", "0.25"], capsys)
    assert code == 2 and "--budget 0.25 contradicts the checkpoint" in err and "budget 0.5" in err
    # a finished run says so, and touches nothing (no new TensorBoard event file)
    events = sorted(os.listdir(os.path.join(straight_run, "tb")))
    code, out, _ = cli(["--data", tiny_cifar, "--workers", "0", "-r", straight_run], capsys)
    assert code == 0 and "is complete (2 of 2 epochs)" in out
    assert sorted(os.listdir(os.path.join(straight_run, "tb"))) == events


@pytest.mark.slow
def test_resume_override_is_printed(straight_run, tiny_cifar, tmp_path, capsys):
    import shutil

    run_dir = str(tmp_path / "longer")
    shutil.copytree(straight_run, run_dir)
    code, out, _ = cli(["--data", tiny_cifar, "--workers", "0", "-r", run_dir, "--epochs", "3", "--lr", "0.01"],
                       capsys)
    assert code == 0
    assert "=> --epochs 3 overrides the checkpoint's 2" in out and "=> --lr 0.01 overrides the checkpoint's 0.05" in out
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["args"]["lr"] == 0.01


@pytest.mark.slow
def test_redirected_output_gets_plain_progress_lines_and_files_follow_the_umask(straight_run, tiny_cifar, tmp_path,
                                                                                capsys):
    old = os.umask(0o022)
    try:
        code, out, _ = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(tmp_path / "run")], capsys)
    finally:
        os.umask(old)
    assert code == 0 and "epoch 1: 3/3 batches, task_loss " in out  # captured output is not a terminal
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "checkpoint.pth").st_mode)
    assert mode == 0o644


def test_a_failed_run_leaves_no_empty_directories(tmp_path, capsys):
    run_dir, data = tmp_path / "run" / "deep", tmp_path / "nodata" / "cifar10"
    code, _, err = cli(["--data", str(data), "--epochs", "1", "-s", str(run_dir), "--workers", "0"], capsys)
    assert code == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "nodata").exists()


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0.5", "--plot_count", "0"], "--plot_count must be at least 1"),
    (["-e", "-r", "RUN", "--fast", "--backend", "cupy"], "cupy backend needs"),
    (["-e", "-r", "RUN", "--plot_only"], "--plot_only goes with -e --plot_ponder"),
])
def test_checks_that_need_no_data_come_first(argv, message, straight_run, tmp_path, capsys):
    """The data set does not exist: these flags are refused before any data would be read."""
    argv = [straight_run if a == "RUN" else a for a in argv]
    code, _, err = cli(["--data", str(tmp_path / "none"), "--workers", "0"] + argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- safe by default (issue 31) and refuse before work (issue 27) ---

class _Payload:
    """Unpickling this creates a marker file: a weights file that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_file(path, marker):
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"fc.weight": _Payload(str(marker))}, f, protocol=2)


def test_a_tampered_weights_cache_runs_no_code(tmp_path, monkeypatch):
    """A payload where torchvision's resnet18 weights are cached: refused by the hash check torchvision publishes
    (the prefix in the file name); a payload whose name carries its own hash: refused by weights_only loading."""
    import hashlib

    from dynconv.models.resnet_imagenet import torchvision_weights
    from dynconv.utils.checkpoint import load_published
    from dynconv.utils.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    _payload_file(cache / "resnet18-f37072fd.pth", marker)
    with pytest.raises(UserError, match="SHA-256 does not start with f37072fd") as e:
        torchvision_weights("resnet18")
    assert "copy" not in str(e.value)
    own = tmp_path / "own.pth"
    _payload_file(own, marker)
    prefix = hashlib.sha256(own.read_bytes()).hexdigest()[:8]
    os.replace(own, cache / f"evil-{prefix}.pth")
    with pytest.raises(UserError, match="could run code; refused") as e:
        load_published(f"https://example.invalid/evil-{prefix}.pth")
    assert "weights_only" not in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "expected a finite number, got 'nan'"),
    (["--gumbel_temp", "nan"], "expected a finite number"),
    (["--budget", "inf"], "expected a finite number"),
    (["--workers", "-1"], "--workers must not be negative"),
    (["--momentum", "-5"], "--momentum must be in [0, 1)"),
    (["--weight_decay", "-1"], "--weight_decay must not be negative"),
    (["--lr_decay", "5", "2"], "--lr_decay epochs must be increasing"),
    (["-s", "/proc/x"], "cannot write to save directory /proc/x"),
])
def test_bad_numbers_and_directories_are_refused_before_any_data(argv, message, tmp_path, capsys):
    code, _, err = cli(TRAIN + ["--data", str(tmp_path / "none"), "--epochs", "1"] +
                       ([] if "-s" in argv else ["-s", str(tmp_path / "run")]) + argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--lr", "1e6"], ["--lr", "1e3"]])
def test_a_diverging_run_stops_and_saves_nothing_from_it(flags, tiny_cifar, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "2", "-s", str(run_dir)] + flags, capsys)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "not finite" in err or "NaN or infinity" in err
    assert "done: best" not in out
    for name in ("checkpoint.pth", "checkpoint_best.pth"):
        if (run_dir / name).exists():
            state = load_checkpoint(str(run_dir / name))["state_dict"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_evaluating_nan_weights_is_refused(straight_run, tiny_cifar, tmp_path, capsys):
    checkpoint = load_checkpoint(os.path.join(straight_run, "checkpoint_best.pth"))
    checkpoint["state_dict"]["fc.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    code, out, err = cli(["--data", tiny_cifar, "--workers", "0", "-r", str(tmp_path / "nan.pth"), "-e"], capsys)
    assert code == 2 and "NaN or infinite weights (fc.weight)" in err and "Prec@1" not in out


def test_resuming_into_another_directory_with_checkpoints_needs_overwrite(straight_run, tiny_cifar, tmp_path,
                                                                          capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pth").write_bytes(b"another run's")
    code, _, err = cli(["--data", tiny_cifar, "--workers", "0", "-r", straight_run, "--epochs", "3",
                        "-s", str(other)], capsys)
    assert code == 2 and "--overwrite" in err
    assert (other / "checkpoint.pth").read_bytes() == b"another run's"


def test_the_same_command_twice_says_it_is_its_own_run(straight_run, tiny_cifar, capsys):
    code, _, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "2", "-s", straight_run], capsys)
    assert code == 2 and "this command's own run" in err and f"python main_cifar.py -r {straight_run}" in err


def test_a_second_run_into_a_locked_directory_is_refused_and_a_stale_lock_taken_over(tiny_cifar, tmp_path,
                                                                                     capsys):
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process
    code, _, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(run_dir)], capsys)
    assert code == 2 and f"another run (process {os.getppid()}" in err
    dead = subprocess_pid_that_ended()
    (run_dir / ".lock").write_text(f"{dead} {socket.gethostname()}\n")
    code, out, _ = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "-s", str(run_dir)], capsys)
    assert code == 0 and f"taking over the lock of a run that no longer runs (process {dead})" in out
    assert not (run_dir / ".lock").exists()


def subprocess_pid_that_ended():
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_full_disk_leaves_the_previous_checkpoint_and_logs_the_epoch_once(tiny_cifar, tmp_path, capsys):
    import errno

    from dynconv.utils import checkpoint as ckpt
    from dynconv.utils.logger import read_jsonl

    run_dir = tmp_path / "run"
    write, calls = ckpt._write_atomically, []

    def full_from_the_second_epoch(state, path):
        calls.append(path)
        if state.get("epoch") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(state, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "_write_atomically", full_from_the_second_epoch)
        code, _, err = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "2", "-s", str(run_dir)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and "the previous one is intact" in err
    assert load_checkpoint(str(run_dir / "checkpoint.pth"))["epoch"] == 1
    assert [r["step"] for r in read_jsonl(str(run_dir / "log.jsonl")) if r["kind"] == "train"] == [1]


@pytest.mark.slow
def test_a_quick_trial_trains_and_evaluates_a_recorded_subset(tiny_cifar, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = cli(TRAIN + ["--data", tiny_cifar, "--epochs", "1", "--limit_train_batches", "2",
                                "--limit_val_batches", "0.5", "-s", str(run_dir)], capsys)
    first = out.splitlines()[0]
    assert code == 0 and "quick trial: train 16 of 24 images (--limit_train_batches 2)" in first
    assert "val 12 of 24 images (--limit_val_batches 0.5)" in first
    assert "epoch 1: 2/2 batches" in out  # 2 minibatches of 8, not the 3 of the whole split
    saved = load_checkpoint(str(run_dir / "checkpoint.pth"))["args"]
    assert (saved["limit_train_batches"], saved["limit_val_batches"]) == (2, 0.5)


@pytest.mark.parametrize("value,message", [("0", "at least 1"), ("1.5", "must be in (0, 1]"), ("x", "a number")])
def test_bad_limits_are_flag_errors(value, message, tmp_path, capsys):
    code, _, err = cli(TRAIN + ["--data", str(tmp_path), "--limit_train_batches", value], capsys)
    assert code == 2 and message in err


def test_lr_0_is_said(tmp_path, capsys):
    code, out, _ = cli(TRAIN + ["--data", str(tmp_path / "none"), "--epochs", "1", "--lr", "0", "-s",
                                str(tmp_path / "run")], capsys)
    assert code == 2 and "--lr 0: the weights will not change" in out  # then the missing data set


def test_a_data_set_with_one_class_is_refused(tmp_path, capsys):
    from synthetic import make_image_folder

    data = make_image_folder(str(tmp_path / "one"), classes=1, per_class=4)
    code, _, err = cli(TRAIN + ["--data", data, "--epochs", "1", "-s", str(tmp_path / "run")], capsys)
    assert code == 2 and "has 1 class" in err


def test_an_unreadable_image_is_named_by_its_path_before_training(tiny_cifar, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_cifar, data)
    (data / "test" / "class0" / "0000.jpg").write_bytes(b"")  # an empty file
    (data / "train" / "class1" / "0001.jpg").write_bytes(b"not an image")
    code, out, err = cli(TRAIN + ["--data", str(data), "--epochs", "1", "-s", str(tmp_path / "run")], capsys)
    assert code == 2 and "BufferedReader" not in err and len(err.strip().splitlines()) == 1
    assert "2 of" in err and os.path.join("class0", "0000.jpg") in err and os.path.join("class1", "0001.jpg") in err
    assert "epoch 1:" not in out  # refused before any training step
