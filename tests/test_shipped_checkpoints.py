"""The CIFAR-10 checkpoints shipped in exp/: found from the tree (git's tracked files, else a glob), at least the
issue's 7 runs in exp/cifar, each with exactly one row in the results.jsonl of its tree (exp/<tree>/results.jsonl,
e.g. exp/cifar for the 10-epoch runs, exp/cifar30 for the 30-epoch ones; a multi-target run: one row per budget,
the budgets its rows name) and each row of such a tree with its checkpoint.

Every family is shipped the same way: CIFAR ResNets, PEDConv, ConvNeXt at 64x64 (main_imagenet.py on the
CIFAR-10 folders) and DGC, the larger ones with float16 weights. Without any data every shipped checkpoint is
checked for what can be checked from the file alone: at most 10 MB, tracked by git and not ignored by .gitignore,
loadable strictly into the row's model (built with the checkpoint's model options) through the model's checkpoint
filter, without optimizer state, with the row's epoch and parameter count, and with an MMac count on a fixed batch
of random images at the row's resolution that the model can have: a static network exactly its hand count; DynConv
strictly between its all-off and all-on counts (hand counts where the table has them, else those of the same model
with synthetic masks all off and all on); a network with gates of its own (DGC, fully pruned after training) the
count of a fresh model of the same options at the end of its pruning schedule, and the paper's published count
where there is one.

Only the accuracy check needs the real data (../shared/data/cifar10-jpeg.tar.gz next to the project, or
CIFAR10_JPEG=<unpacked cifar10-jpeg root>) and skips without it; it evaluates a fixed subset of the test split."""
import collections
import glob
import json
import os
import shutil
import subprocess
import tarfile

import pytest
import torch

from conftest import ROOT
from dynconv import count_mmac, count_parameters, set_gate_schedule
from dynconv.models import Decides, build_model, model_config, model_family
from dynconv.models.dgc import paper_mmac
from dynconv.sparse.masks import install_synthetic_masks
from dynconv.utils.checkpoint import load_checkpoint, load_weights
from dynconv.utils.data import cifar_transforms, imagenet_transforms
from dynconv.utils.training import validate
from dynconv.utils.distributed import DistContext

RESULTS = os.path.join(ROOT, "exp", "cifar", "results.jsonl")  # the issue's runs: this tree must exist
CHECKPOINT = "checkpoint_best.pth"
SUBSET = 500  # test images, the first 50 of every class
MAX_BYTES = 10 * 10**6  # the project's limit for a tracked file
ISSUE_RUNS = {("resnet8", -1), ("resnet8", 0.25), ("resnet8", 0.5), ("resnet8", 0.75), ("resnet32", -1),
              ("resnet32", 0.5), ("resnet20", -1)}
# MMac per 32x32 image (tests/test_models_cifar.py holds the models to these numbers; convnext_atto's, at 64x64,
# tests/test_convnext.py's hand count)
DENSE_MMAC = {"resnet8": 12.500992, "resnet14": 26.656768, "resnet20": 40.812544, "resnet32": 69.124096,
              "convnext_atto": 44.965120}
PAPER_MMAC = {("dydensenet86", 0.25): 71.04}  # the DGC paper's count of its CIFAR-10 network, its printed digits


def pedconv_extra_mmac(blocks_per_stage):
    """What the PEDConv CIFAR ResNet adds to the static one's MMac, by hand (rank 1, per_image path, 32x32): per
    3x3 conv C_in -> C_out with input side s_in and output side s_out, the generator's linears with biases
    (C_in -> C_in/16, then -> C_in, C_out and 9) and applying the attention (C_in per input position, one multiply
    per kernel element, C_out per output position)."""
    macs, side, width = 0, 32, 16
    for stage, out in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            for conv in range(2):
                c_in = width if conv == 0 else out
                stride = 2 if stage > 0 and block == 0 and conv == 0 else 1
                hidden, s_in, s_out = c_in // 16, side, side // stride
                generator = c_in * hidden + hidden + hidden * (c_in + out + 9) + (c_in + out + 9)
                macs += generator + c_in * s_in ** 2 + out * c_in * 9 + out * s_out ** 2
                side, width = s_out, out
    return macs / 1e6


DENSE_MMAC["pedconv_resnet32"] = DENSE_MMAC["resnet32"] + pedconv_extra_mmac(5)  # no gates: its count is fixed
DYNCONV_MMAC = {"resnet8": (0.908608, 12.705088), "resnet32": (1.946176, 70.365760)}  # (all off, all on), by hand


def _in_git_work_tree():
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "true"


def shipped_checkpoints():
    """Paths (relative to the project, '/'-separated) of the checkpoint_best.pth files under exp/ that git tracks;
    every such file under exp/ where there is no git."""
    if _in_git_work_tree():
        listed = subprocess.run(["git", "ls-files", "-z", f"exp/**/{CHECKPOINT}"], cwd=ROOT, capture_output=True,
                                text=True, check=True)
        return sorted(p for p in listed.stdout.split("\0") if p)
    found = glob.glob(os.path.join(ROOT, "exp", "**", CHECKPOINT), recursive=True)
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in found)


def results_file(run):
    """The results table of the tree a run lies in: exp/<tree>/results.jsonl."""
    return os.path.join(ROOT, *run.split("/")[:2], "results.jsonl")


def read_rows(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []


CHECKPOINTS = shipped_checkpoints()
RUNS = [os.path.dirname(p) for p in CHECKPOINTS]  # a run is its checkpoint's directory, as in the results rows
RESULTS_FILES = sorted({results_file(run) for run in RUNS} | {RESULTS})
ROWS = [row for path in RESULTS_FILES for row in read_rows(path)]
ROWS_BY_RUN = collections.defaultdict(list)
for _row in ROWS:
    ROWS_BY_RUN[_row["run"]].append(_row)


def expected_rows(run):
    """How many results rows `run` must have: one, or one per budget of a multi-target run."""
    return len(ROWS_BY_RUN[run][0].get("targets", [None])) if ROWS_BY_RUN[run] else 1


def fresh_model(row, args):
    """The row's network as its checkpoint's arguments describe it (model options, spatial gates, budgets, tied
    norms), with its initial weights, in eval mode."""
    targets = row.get("targets") or ()
    return build_model(row["model"], 10, spatial_gates=row["budget"] >= 0, targets=targets,
                       options=args.get("model_kwargs"), tied_norms=bool(args.get("tied_norms"))).eval()


def load_shipped(run):
    """(results rows, checkpoint dict, model in eval mode with the checkpoint's weights loaded strictly)."""
    rows = sorted(ROWS_BY_RUN[run], key=lambda r: r["budget"])
    assert len(rows) == expected_rows(run), f"{run}: expected {expected_rows(run)} rows in {results_file(run)}"
    targets = rows[0].get("targets")
    assert targets is None or [r["budget"] for r in rows] == sorted(targets), f"{run}: a row per budget"
    path = os.path.join(ROOT, run, CHECKPOINT)
    checkpoint = load_checkpoint(path)
    model = fresh_model(rows[0], checkpoint.get("args") or {})
    load_weights(model, model_config(rows[0]["model"]), checkpoint["state_dict"], path)
    return rows, checkpoint, model.eval()


def forward_kwargs(row):
    """The budget a multi-target row was evaluated at."""
    return {"target": row["budget"]} if row.get("targets") else {}


def test_every_shipped_checkpoint_has_one_results_row_and_every_row_a_checkpoint():
    missing = [path for path in RESULTS_FILES if not os.path.isfile(path)]
    assert missing == [], f"results tables missing beside shipped checkpoints: {missing}"
    assert len(CHECKPOINTS) >= 7, f"expected at least the issue's 7 shipped checkpoints, found {CHECKPOINTS}"
    counts = collections.Counter(r["run"] for r in ROWS)
    assert {run: n for run, n in counts.items() if n != expected_rows(run)} == {}, "runs with too many rows"
    assert sorted(counts) == sorted(RUNS), "results rows and shipped checkpoints differ"
    assert ISSUE_RUNS <= {(r["model"], r["budget"]) for r in read_rows(RESULTS)}


def test_shipped_checkpoints_are_tracked_and_not_ignored():
    if not _in_git_work_tree():
        pytest.skip("not a git work tree")
    for path in CHECKPOINTS:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
        assert tracked.returncode == 0, f"git does not track {path}"
        # --no-index: the .gitignore rules themselves (without it git never reports a tracked file as ignored),
        # so a re-trained checkpoint at this path would be picked up by `git add`
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode
        assert ignored == 1, f".gitignore ignores the shipped checkpoint {path}"


@pytest.mark.parametrize("run", RUNS)
def test_shipped_checkpoint_without_data(run):
    assert os.path.getsize(os.path.join(ROOT, run, CHECKPOINT)) <= MAX_BYTES
    rows, checkpoint, model = load_shipped(run)
    assert "optimizer" not in checkpoint
    side = rows[0].get("resolution", 32)
    images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(0))
    for row in rows:
        assert checkpoint["epoch"] == row["epoch"]
        assert count_parameters(model) == row["params"]
        check_mmac(row, count_mmac(model, images, **forward_kwargs(row)), checkpoint.get("args") or {}, images)


def synthetic_bounds(row, args, images):
    """(all off, all on) MMac of the row's DynConv network: the same model with synthetic masks at density 0 and 1."""
    bounds = []
    for density in (0.0, 1.0):
        model = fresh_model(row, args)
        install_synthetic_masks(model, density)
        bounds.append(count_mmac(model, images, **forward_kwargs(row)))
    return tuple(bounds)


def check_mmac(row, mmac, args, images):
    """A static network: exactly its hand count; DynConv: strictly between its all-off and all-on counts; gates
    of its own: a fresh model's count at the end of its pruning schedule (and the paper's, where published)."""
    name, kind = row["model"], model_config(row["model"]).gates
    if kind is Decides.OWN:
        fresh = fresh_model(row, args).train()
        set_gate_schedule(fresh, progress=1.0)  # the end of training: every head at its final width
        fresh.eval()
        assert mmac == pytest.approx(count_mmac(fresh, images), abs=5e-7)
        assert row["mmac"] == pytest.approx(mmac, abs=5e-7)
        factor = (args.get("model_kwargs") or {}).get("gate_factor")
        if (name, factor) in PAPER_MMAC:
            assert round(paper_mmac(fresh, images[:1]), 2) == PAPER_MMAC[name, factor]
    elif row["budget"] < 0:
        assert name in DENSE_MMAC, f"no reference dense MMac for {name}: add it to DENSE_MMAC"
        assert mmac == pytest.approx(DENSE_MMAC[name], abs=5e-7)
        assert row["mmac"] == pytest.approx(DENSE_MMAC[name], abs=5e-7)
    else:
        all_off, all_on = synthetic_bounds(row, args, images)
        if name in DYNCONV_MMAC:  # the synthetic masks' bounds against the hand counts
            assert (all_off, all_on) == pytest.approx(DYNCONV_MMAC[name], abs=5e-7)
        assert all_off < mmac < all_on
        assert all_off < row["mmac"] < all_on


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
    def subset(row):
        """The subset as the row's entry script reads it: its model's normalisation, at the row's resolution."""
        config = model_config(row["model"])
        transform = (cifar_transforms(config)[1] if model_family(row["model"]) == "cifar" else
                     imagenet_transforms(config, row["resolution"])[1])
        test = datasets.ImageFolder(os.path.join(root, "test"), transform=transform)
        keep = [i for i, (path, _) in enumerate(test.samples)
                if int(os.path.splitext(os.path.basename(path))[0]) < SUBSET // 10]
        return torch.utils.data.Subset(test, keep)
    return subset


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_shipped_checkpoint_accuracy_on_real_images(run, cifar_test_subset):
    rows, _, model = load_shipped(run)
    loader = torch.utils.data.DataLoader(cifar_test_subset(rows[0]), batch_size=100)
    for row in rows:
        target = forward_kwargs(row).get("target")
        metrics = validate(model, loader, DistContext(), show_progress=False, target=target)
        # a fixed 500-image subset: close to the full-test-set number in the README (binomial noise ~2 points)
        assert abs(metrics["prec1"] - row["prec1"]) < 7
        assert metrics["mmac"] == pytest.approx(row["mmac"], rel=0.15)
