"""Preemption: SIGTERM / SIGINT sent to a training run's whole process group (as `timeout`, Slurm's scancel and a
terminal's Ctrl-C do), DataLoader workers and torchrun included, save a resumable checkpoint, print one line and
exit 143 / 130; the run then resumes to its full number of epochs, logging each epoch once."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dynconv.utils import interrupt
from dynconv.utils.checkpoint import load_checkpoint
from dynconv.utils.interrupt import StopNow, StopRequest
from dynconv.utils.logger import read_jsonl
from synthetic import make_image_folder

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 images: 15 minibatches of 8 per epoch, so that the signal lands inside training."""
    return make_image_folder(str(tmp_path_factory.mktemp("preempt_data")), classes=3, per_class=40)


def _command(data, run_dir, workers, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return launcher + ["main_cifar.py", "--model", "resnet8", "--budget", "0.5", "--batchsize", "8", "--lr", "0.05",
                       "--workers", str(workers), "--epochs", str(EPOCHS), "--device", "cpu", "--data", data,
                       "-s", run_dir]


def _signal_group(command, signals, delay=0.3):
    """Starts `command` in its own session (its own process group), waits until it trains, then sends each of
    `signals` to the whole group; returns (exit status, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # a crash prints its Python stacks
    p = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            if line.startswith("=> training epochs"):
                time.sleep(delay)
                for sig in signals:
                    os.killpg(p.pid, sig)
                    time.sleep(0.05)
                break
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, "".join(out) + rest, err


def _our_lines(err):
    """stderr without the warning of a fused-kernel build that the signal cut short (it is the compiler's)."""
    return [line for line in err.strip().splitlines() if "fused CPU kernels" not in line and "return _load()"
            not in line]


def _resume_to_the_end(data, run_dir, workers):
    resumed = subprocess.run([sys.executable, "main_cifar.py", "--data", data, "--workers", str(workers),
                              "-r", run_dir], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["epoch"] == EPOCHS
    logged = [r["step"] for r in read_jsonl(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "train"]
    assert logged == list(range(1, EPOCHS + 1))  # every epoch once, none lost, none twice


def _request(monkeypatch, torchrun):
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    return StopRequest()


@pytest.mark.parametrize("where", ["before its arrival is recorded", "while it prints"])
def test_torchruns_copy_landing_inside_the_first_handler_is_the_same_request(where, monkeypatch, capsys):
    """Python runs a handler for a signal that lands while another handler runs inside that one: torchrun's copy
    landing there is still one request and one line (CI once printed the line twice)."""
    stop = _request(monkeypatch, torchrun=True)
    nested = []
    real_monotonic, real_print = time.monotonic, print

    def copy_lands():
        if not nested:
            nested.append(True)
            stop._handle(signal.SIGTERM, None)

    if where == "before its arrival is recorded":
        monkeypatch.setattr(interrupt.time, "monotonic", lambda: (copy_lands(), real_monotonic())[1])
    else:
        monkeypatch.setattr("builtins.print", lambda *a, **k: (copy_lands(), real_print(*a, **k)))
    stop._handle(signal.SIGTERM, None)
    assert nested and stop.signal == signal.SIGTERM and stop.exit_code == 143
    assert capsys.readouterr().out.count("SIGTERM received") == 1


def test_without_torchrun_a_signal_inside_the_first_handler_stops_at_once(monkeypatch):
    stop = _request(monkeypatch, torchrun=False)
    real_print = print
    monkeypatch.setattr("builtins.print", lambda *a, **k: (stop._handle(signal.SIGINT, None), real_print(*a, **k)))
    with pytest.raises(StopNow) as stopped:
        stop._handle(signal.SIGTERM, None)
    assert stopped.value.code == 130 and stop.signal == signal.SIGTERM


def test_torchruns_copy_after_the_repeat_window_stops_at_once(monkeypatch):
    stop = _request(monkeypatch, torchrun=True)
    clock = iter([100.0, 100.0 + interrupt.REPEAT_SECONDS + 1])
    monkeypatch.setattr(interrupt.time, "monotonic", lambda: next(clock))
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(StopNow):
        stop._handle(signal.SIGTERM, None)


@pytest.mark.slow
# without workers and with two (each gets the group's signal too); test_under_torchrun_... has one worker
@pytest.mark.parametrize("sig,code,workers", [(signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 2)])
def test_a_signal_to_the_process_group_saves_and_the_run_resumes(sig, code, workers, data, tmp_path):
    run_dir = str(tmp_path / "run")
    got, out, err = _signal_group(_command(data, run_dir, workers), [sig])
    assert got == code, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    ours = _our_lines(err)
    assert len(ours) == 1 and ours[0].startswith(f"interrupted: saved {os.path.join(run_dir, 'checkpoint.pth')}")
    assert out.count(f"{signal.Signals(sig).name} received") == 1  # the workers do not print it too
    assert not os.path.exists(os.path.join(run_dir, ".lock"))
    _resume_to_the_end(data, run_dir, workers)


@pytest.mark.slow
def test_a_second_signal_stops_at_once_without_a_traceback(data, tmp_path):
    run_dir = str(tmp_path / "run")
    got, out, err = _signal_group(_command(data, run_dir, 2), [signal.SIGTERM, signal.SIGTERM])
    # 143 from our exit, or death by the SIGTERM itself when it lands after the exit began (a shell shows 143
    # for both)
    assert got in (143, -signal.SIGTERM) and "Traceback" not in err + out
    assert len(_our_lines(err)) <= 1 and all(line.startswith("interrupted") for line in _our_lines(err))


@pytest.mark.slow
def test_under_torchrun_the_workers_save_once_and_the_run_resumes(data, tmp_path):
    """torchrun forwards the group's SIGTERM to its processes, which then get it twice: still one request. The
    traceback of torchrun itself (its SignalException) is torchrun's; our processes print one line."""
    run_dir = str(tmp_path / "run")
    got, out, err = _signal_group(_command(data, run_dir, 1, torchrun=True), [signal.SIGTERM], delay=0.5)
    assert got != 0
    ours = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1 and ours[0].startswith("interrupted: saved "), err[-3000:]
    assert out.count("SIGTERM received") == 1
    _resume_to_the_end(data, run_dir, 1)


def test_a_signal_while_the_processes_connect_is_one_line(data, tmp_path, monkeypatch):
    """torchrun closes its store when the group gets a signal; a process still connecting (DistributedDataParallel's
    set-up) then gets a RuntimeError from the store. With a stop requested that is the interruption: one line,
    the signal's exit code, nothing saved yet (the set-up comes before the first step)."""
    from conftest import run_command
    from dynconv.utils import fit

    def connect_and_lose_the_store(model, args, ctx):
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's stop request
        raise RuntimeError("Connection closed by peer [127.0.0.1]:7360")

    monkeypatch.setattr(fit, "_distributed", connect_and_lose_the_store)
    run_dir = str(tmp_path / "run")
    result = run_command("dynconv.apps.cifar", *_command(data, run_dir, 0)[2:])
    assert result.returncode == 143
    assert result.stderr.strip().splitlines()[-1] == "interrupted: no checkpoint was saved by this run"
    assert "=> training epochs" not in result.stdout and not os.path.exists(os.path.join(run_dir, "checkpoint.pth"))
