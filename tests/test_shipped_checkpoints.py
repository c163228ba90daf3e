"""The CIFAR-10 checkpoints shipped in exp/cifar: small, loadable, and accurate on real test images.

The accuracy check runs when the real data is on the machine (../shared/data/cifar10-jpeg.tar.gz next to the
project, or CIFAR10_JPEG=<unpacked cifar10-jpeg root>); it evaluates a fixed subset of the test split."""
import json
import os
import subprocess
import tarfile

import pytest
import torch

from conftest import ROOT
from dynconv import MaskUnit, count_parameters
from models import create_model, model_config
from utils.checkpoint import load_checkpoint, load_model_state
from utils.data import cifar_transforms
from utils.training import validate
from utils.distributed import DistContext

RESULTS = os.path.join(ROOT, "exp", "cifar", "results.jsonl")
ROWS = [json.loads(line) for line in open(RESULTS)] if os.path.isfile(RESULTS) else []
SUBSET = 500  # test images, the first 50 of every class


@pytest.fixture(scope="module")
def cifar_test_subset(tmp_path_factory):
    from torchvision import datasets

    root = os.environ.get("CIFAR10_JPEG")
    if not root:
        archive = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
        if not os.path.isfile(archive):
            pytest.skip("real CIFAR-10 copy not on this machine")
        root = str(tmp_path_factory.mktemp("cifar"))
        with tarfile.open(archive) as tar:
            wanted = [m for m in tar.getmembers() if "/test/" in m.name and m.isfile()
                      and int(os.path.splitext(os.path.basename(m.name))[0]) < SUBSET // 10]
            tar.extractall(root, members=wanted, filter="data")
        root = os.path.join(root, "cifar10-jpeg")
    test = datasets.ImageFolder(os.path.join(root, "test"), transform=cifar_transforms(model_config("resnet8"))[1])
    keep = [i for i, (path, _) in enumerate(test.samples) if int(os.path.splitext(os.path.basename(path))[0]) < SUBSET // 10]
    return torch.utils.data.Subset(test, keep)


def test_results_cover_the_issue_runs():
    if not ROWS:
        pytest.skip("no results shipped yet")
    runs = {(r["model"], r["budget"]) for r in ROWS}
    assert {("resnet8", -1), ("resnet8", 0.25), ("resnet8", 0.5), ("resnet8", 0.75), ("resnet32", -1),
            ("resnet32", 0.5), ("resnet20", -1)} <= runs


@pytest.mark.parametrize("row", ROWS, ids=[r["run"] for r in ROWS])
def test_shipped_checkpoint(row, cifar_test_subset):
    path = os.path.join(ROOT, row["run"], "checkpoint_best.pth")
    assert os.path.getsize(path) < 5 * 2**20
    tracked = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode
    assert tracked == 1, "git would ignore the shipped checkpoint"
    checkpoint = load_checkpoint(path)
    assert "optimizer" not in checkpoint and checkpoint["epoch"] == row["epoch"]
    model = create_model(row["model"], "cifar", gate_layer=MaskUnit if row["budget"] >= 0 else None)
    load_model_state(model, checkpoint["state_dict"], path)
    assert count_parameters(model) == row["params"]
    loader = torch.utils.data.DataLoader(cifar_test_subset, batch_size=100)
    metrics = validate(model, loader, DistContext(), show_progress=False)
    # a fixed 500-image subset: close to the full-test-set number in the README (binomial noise ~2 points)
    assert abs(metrics["prec1"] - row["prec1"]) < 7
    assert metrics["mmac"] == pytest.approx(row["mmac"], rel=0.15)
