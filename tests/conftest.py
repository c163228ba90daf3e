import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import make_image_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A 3-class, 32x32 image-folder data set with train/ and test/."""
    return make_image_folder(str(tmp_path_factory.mktemp("tiny_cifar")), classes=3, per_class=8)


def set_mask_logits(model, value):
    """Makes every mask unit output constant logits `value` (>0: every position on, <0: off)."""
    import torch
    from dynconv.maskunit import MaskLogits

    for m in model.modules():
        if isinstance(m, MaskLogits):
            torch.nn.init.zeros_(m.conv.weight)
            torch.nn.init.zeros_(m.fc.weight)
            torch.nn.init.constant_(m.conv.bias, value / 2)
            torch.nn.init.constant_(m.fc.bias, value / 2)


def run_entry(main, argv, capsys=None):
    """Runs an entry script's main(argv) in-process as the command line does (run_cli: one-line errors, exit
    codes); returns (exit code, stdout, stderr)."""
    from dynconv.utils.errors import run_cli

    code = 0
    try:
        run_cli(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def run_command(module, *argv):
    """`python -m module argv...` from the project's root, run in this process: the module's cli() with sys.argv
    set, stdout and stderr captured, the exit code SystemExit's; a CompletedProcess like subprocess.run's. (A
    subprocess starts torch again, ~2 s each; test_flag_errors_benchmark_times_refusals runs every command as a
    real process.) What a command changes for its own run is put back: the environment (speedtest and compare set
    OMP_WAIT_POLICY, which later subprocesses would inherit), torch's thread count and denormal flushing
    (train_speed turns it on)."""
    import torch

    saved_env, saved_threads, saved_argv = dict(os.environ), torch.get_num_threads(), sys.argv
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = [module, *argv]
            try:
                importlib.import_module(module).cli()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        torch.set_flush_denormal(False)
    return subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())
