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
