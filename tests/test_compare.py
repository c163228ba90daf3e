"""dynconv/scripts/compare.py end to end on a tiny synthetic image folder: runs of two families (dense and DynConv)
trained for one epoch, compared with their stored metrics, at another input size, and evaluated again."""
import json
import os

import pytest
import torch

import main_cifar
from conftest import run_entry
from test_benchmarks_cli import load_script, one_line_error
from dynconv import count_mmac
from dynconv.models import create_model
from dynconv.utils.checkpoint import save_checkpoint
from dynconv.utils.plot import row_family

TRAIN = ["--model", "resnet8", "--batchsize", "8", "--workers", "0", "--epochs", "1"]
FAST = ["--runs-per-path", "1", "--warmup", "0", "--batch-sizes", "1", "2", "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def compare():
    return load_script("dynconv/scripts/compare.py")


@pytest.fixture(scope="module")
def runs(tiny_cifar, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = {"dense": str(root / "base"), "DynConv": str(root / "sparse05")}
    for family, budget in (("dense", "-1"), ("DynConv", "0.5")):
        assert run_entry(main_cifar.main, TRAIN + ["--budget", budget, "--data", tiny_cifar,
                                                   "-s", dirs[family]])[0] == 0
    return dirs


@pytest.fixture(scope="module")
def compared(compare, runs, tiny_cifar, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    rows = compare.main([runs["dense"], runs["DynConv"], "--data", tiny_cifar, "--out", out, "--resolutions", "24"]
                        + FAST)
    return rows, out


@pytest.mark.slow
def test_one_row_per_run_and_input_size_with_its_family(compared, runs):
    rows, out = compared
    with open(os.path.join(out, "compare.jsonl")) as f:
        assert [json.loads(line) for line in f] == rows
    assert [(r["run"], r["resolution"], r["source"]) for r in rows] == [  # dense first, then by input size
        (runs["dense"], 24, "evaluated"), (runs["dense"], 32, "stored"),
        (runs["DynConv"], 24, "evaluated"), (runs["DynConv"], 32, "stored")]
    assert [row_family(r) for r in rows] == ["dense", "dense", "DynConv", "DynConv"]
    assert [r.get("varied") for r in rows] == ["resolution", None, "resolution", None]
    # MACs follow the input size: the dense resnet8's convolutions at 24x24 are (24/32)^2 of those at 32x32
    assert rows[0]["mmac"] == pytest.approx(rows[1]["mmac"] * (24 / 32) ** 2, rel=1e-6)
    table = open(os.path.join(out, "compare.md")).read().splitlines()
    assert all(r["epochs"] == 1 for r in rows)  # the training schedule's length, from the run's own arguments
    assert len(table) == 2 + len(rows) and table[3].startswith("| dense | resnet8 | dense | 32px | 1 |")
    # one dense model per input size is no curve: no gap to it at equal MMac
    assert [r.get("vs_dense", "absent") for r in rows] == ["absent", "absent", None, None]


def dense(mmac, prec1, **kw):
    return {"budget": -1, "arch": "ResNet", "epochs": 30, "resolution": 32, "mmac": mmac, "prec1": prec1, **kw}


def test_the_gap_to_the_dense_curve_is_read_off_the_chord_of_its_neighbours(compare):
    # dense ResNets at 10, 20 and 40 MMac with 80, 84 and 86%, shuffled: the curve's chords
    rows = [dense(40.0, 86.0), dense(10.0, 80.0), dense(20.0, 84.0)]
    judged = [
        {**dense(15.0, 83.0), "budget": 0.5},  # halfway from 80 to 84: 82%, so +1 point
        {**dense(35.0, 84.0), "budget": 0.75},  # 3/4 of the way from 84 to 86: 85.5%, so -1.5 points
        {**dense(20.0, 84.25), "method": "PEDConv", "budget": -1},  # on a dense model: +0.25
        {**dense(5.0, 79.0), "budget": 0.25},  # left of the smallest dense model: no curve there
        {**dense(15.0, 83.0), "budget": 0.5, "epochs": 10},  # another schedule has no dense curve here
        {**dense(15.0, 83.0), "budget": 0.5, "arch": "ConvNeXt"},  # nor another network type
    ]
    compare.add_dense_gaps(rows + judged)
    assert [r["vs_dense"] for r in judged] == [1.0, -1.5, 0.25, None, None, None]
    assert all("vs_dense" not in r for r in rows)


def timed(row, **batches):
    """`row` with latency_ms {batch: {path: ms}} from keyword b<batch>={path: ms}."""
    return {**row, "latency_ms": {k[1:]: v for k, v in batches.items()}}


def test_the_gap_at_equal_latency_is_read_off_the_dense_chord_per_batch_size(compare):
    # dense models at batch 1: 1, 2 and 4 ms (80, 84, 86%); at batch 64: 10, 20, 40 ms; each row's fastest path
    rows = [timed(dense(40.0, 86.0), b1={"model": 4.0}, b64={"model": 40.0}),
            timed(dense(10.0, 80.0), b1={"model": 1.0}, b64={"model": 10.0}),
            timed(dense(20.0, 84.0), b1={"model": 2.0}, b64={"model": 20.0})]
    judged = [
        # batch 1: the engine's 1.5 ms is halfway from 80 to 84 (82%): +1; batch 64: 30 ms, halfway from 84 to
        # 86 (85%): -2
        timed({**dense(15.0, 83.0), "budget": 0.5}, b1={"model": 3.0, "fast": 1.5}, b64={"model": 30.0}),
        # slower than every dense model at batch 1 (no curve there); at batch 64, 35 ms: 85.5%, so -1.5
        timed({**dense(35.0, 84.0), "budget": 0.25}, b1={"model": 5.0}, b64={"model": 35.0}),
        timed({**dense(15.0, 83.0), "budget": 0.5, "epochs": 10}, b1={"model": 1.5}),  # another schedule
        {**dense(15.0, 83.0), "budget": 0.5, "latency_ms": {}},  # not timed (a results-file row)
        # batch 1: 1.5 ms, 82% on the chord: +1.5; faster than every dense model at batch 64 (8 ms) and 3.5 points
        # above the fastest (80%): at least +3.5; the next one is faster too but less accurate (79 < 80): nothing
        timed({**dense(15.0, 83.5), "budget": 0.25}, b1={"model": 1.5}, b64={"model": 8.0}),
        timed({**dense(8.0, 79.0), "budget": 0.25}, b1={"model": 0.5}),
    ]
    compare.add_dense_gaps(rows + judged)
    assert [r["vs_dense_latency"] for r in judged] == [{"1": 1.0, "64": -2.0}, {"1": None, "64": -1.5},
                                                       {"1": None}, {}, {"1": 1.5, "64": None}, {"1": None}]
    assert [r.get("vs_dense_latency_lower_bound") for r in judged] == [None, None, None, None, {"64": 3.5}, None]
    assert [r["vs_dense"] for r in judged] == [1.0, -1.5, None, 1.0, 1.5, None]  # the MMac gap as before
    assert [r.get("vs_dense_lower_bound") for r in judged] == [None] * 6  # 8 MMac, 79%: below the first point
    assert all("vs_dense_latency" not in r for r in rows)
    shown = [{**r, "model": "resnet32", "params": 1, "source": "stored"} for r in rows + judged]
    table = compare.markdown_table(shown, [1, 64]).splitlines()
    head = [c.strip() for c in table[0].split("|")]
    row = [c.strip() for c in table[2 + len(rows)].split("|")]
    assert [row[head.index(f"vs dense at equal {x}")] for x in ("MMac", "ms b1", "ms b64")] == ["+1.00", "+1.00",
                                                                                               "-2.00"]
    row = [c.strip() for c in table[2 + len(rows) + 4].split("|")]
    assert [row[head.index(f"vs dense at equal {x}")] for x in ("MMac", "ms b1", "ms b64")] == ["+1.50", "+1.50",
                                                                                               ">= +3.50"]


@pytest.mark.slow
def test_latency_of_every_path_is_present_and_positive(compared):
    rows, _ = compared
    for r in rows:
        paths = {"model", "fast"} if r["budget"] >= 0 else {"model"}  # the sparse engine needs gates
        assert set(r["latency_ms"]) == {"1", "2"} and all(set(t) == paths for t in r["latency_ms"].values())
        assert all(ms > 0 for t in r["latency_ms"].values() for ms in t.values())
        assert r["timing"]["threads"] == 1 and r["timing"]["runs"] == 1


@pytest.mark.slow
def test_ptflops_agrees_with_our_full_count_for_dense_models(compared):
    rows, _ = compared
    for r in rows:
        if r["budget"] >= 0:
            assert "ptflops_mmac" not in r
            continue
        size = r["resolution"]
        ours = count_mmac(create_model("resnet8", num_classes=3).eval(), torch.randn(1, 3, size, size), full=True)
        assert r["ptflops_mmac"] == pytest.approx(ours, abs=1e-6) and r["full_mmac"] == pytest.approx(ours, abs=1e-6)
        assert r["ptflops_mmac"] > r["mmac"]  # BN, ReLU, pooling and the classifier on top of the convolutions


@pytest.mark.slow
def test_both_plots_are_written_and_drawn(compared):
    _, out = compared
    for name in ("accuracy_vs_mmac.png", "accuracy_vs_latency_b1.png", "accuracy_vs_latency_b2.png"):
        assert os.path.getsize(os.path.join(out, name)) > 10_000, name  # an empty 6.4x4.8 figure is ~5 kB


@pytest.mark.slow
def test_evaluating_again_gives_the_stored_accuracy(compare, compared, runs, tiny_cifar, tmp_path):
    stored = {(r["run"], r["resolution"]): r for r in compared[0]}
    rows = compare.main([runs["DynConv"], "--data", tiny_cifar, "--out", str(tmp_path), "--evaluate"] + FAST)
    assert [r["source"] for r in rows] == ["evaluated"]
    assert (rows[0]["prec1"], rows[0]["mmac"]) == (stored[runs["DynConv"], 32]["prec1"],
                                                   stored[runs["DynConv"], 32]["mmac"])


def test_a_run_without_a_checkpoint_is_one_line(compare, tmp_path, tiny_cifar, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    code, _, err = run_entry(compare.main, [str(empty), "--data", tiny_cifar], capsys)
    one_line_error(code, err, str(empty), "checkpoint_best.pth")


def test_a_checkpoint_of_no_run_is_one_line(compare, tmp_path, tiny_cifar, capsys):
    path = str(tmp_path / "weights.pth")
    save_checkpoint({"state_dict": create_model("resnet8").state_dict()}, path)
    code, _, err = run_entry(compare.main, [path, "--data", tiny_cifar, "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, path, "names no model")


def test_a_resolution_below_one_is_one_line(tiny_cifar, tmp_path, capsys):
    code, _, err = run_entry(main_cifar.main, TRAIN + ["--data", tiny_cifar, "-s", str(tmp_path / "run"),
                                                       "--resolution", "0"], capsys)
    one_line_error(code, err, "--resolution", "positive")
    assert not os.path.exists(tmp_path / "run")
