import os
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
