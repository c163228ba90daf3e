"""The benchmarks and dynconv/scripts/cifar_results.py as a new user meets them: one-line errors with exit code 2 (never a
traceback), -h with defaults and examples, a table that fits a terminal, a plot of every CSV group (also redrawn
from a CSV), and a results file that git tracks left alone unless asked."""
import csv
import hashlib
import json
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_command, run_entry
from dynconv import MaskUnit, count_parameters
from dynconv.models import create_model

SPEEDTEST, TRAIN_SPEED = "dynconv/benchmarks/speedtest.py", "dynconv/benchmarks/train_speed.py"
CIFAR_RESULTS = "dynconv/scripts/cifar_results.py"
TINY_RUN = ["--models", "resnet8", "--batch-sizes", "1", "--densities", "0.5", "--runs", "1", "--warmup", "0",
            "--resolution", "32"]
SHIPPED_RUN = os.path.join("exp", "cifar", "resnet8", "base")
TRACKED_RESULTS = os.path.join("exp", "cifar", "results.jsonl")


def script(path, *argv):
    """A command of the package as a user runs it from a clone: `python -m dynconv.benchmarks.speedtest ...`."""
    return run_command(path[:-len(".py")].replace("/", "."), *argv)


def one_line_error(code, err, *words):
    """The contract of every user error: exit code 2 and one line on stderr that says what is wrong."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert all(word in lines[0] for word in words), lines[0]


def load_script(path):
    """A script as a module, the environment left as it was (speedtest sets OMP_WAIT_POLICY for its own run)."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    return module


@pytest.fixture(scope="module")
def speedtest():
    return load_script(SPEEDTEST)


@pytest.fixture(scope="module")
def cifar_results():
    return load_script(CIFAR_RESULTS)


def in_git_checkout():
    try:
        done = subprocess.run(["git", "ls-files", "--error-unmatch", TRACKED_RESULTS], cwd=ROOT, capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


# quick lane: the scripts' functions in-process

def test_the_compact_table_fits_120_columns(speedtest):
    row = {"model": "resnet101", "batch": 256, "density": 0.125, "masks": "clustered", "active_fraction": 0.1234,
           "dense_ms": 123456.789, "masked_ms": 1.234, "engine_ms": 99999.9, "dense_mmac": 7799.357,
           "sparse_mmac": 1495.097, "engine_mmac": 1601.5, "ideal_speedup": 15.034, "speedup": 12.345, "efficiency": 1.234}
    lines = [speedtest.table_header(), speedtest.table_row(row)]
    assert all(len(line) <= 120 for line in lines) and "123456.8" in lines[1] and "1.23" in lines[1]


def test_the_plot_draws_every_group_with_a_title(speedtest, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [{"model": m, "batch": b, "masks": k, "ideal_speedup": i, "speedup": s}
            for m, b, k, i, s in [("resnet50", 1, "clustered", 2.0, 1.5), ("resnet50", 1, "clustered", 4.0, 2.2),
                                  ("resnet50", 16, "clustered", 4.0, 3.0), ("resnet50", 1, "random", 2.0, 1.6),
                                  ("resnet101", 1, "random", 2.1, 1.7)]]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    speedtest.plot(rows, str(tmp_path / "speed.png"), "CPU")
    ax = figures[0].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert {"resnet50, batch 1, random", "resnet101, batch 1, random", "resnet50, batch 16, clustered"} <= set(labels)
    assert len(labels) == 5 and ax.get_title() == "Sparse engine on CPU: achieved against ideal speedup"
    assert os.path.getsize(tmp_path / "speed.png") > 0


def test_cifar_results_checks_paths_before_evaluating(cifar_results, tmp_path, capsys):
    missing = str(tmp_path / "no_run")
    code, _, err = run_entry(cifar_results.main, [missing, SHIPPED_RUN, "--data", str(tmp_path)], capsys)
    one_line_error(code, err, missing, "checkpoint_best.pth")
    assert SHIPPED_RUN not in err, "only the run directories without a checkpoint are named"
    code, _, err = run_entry(cifar_results.main, [SHIPPED_RUN, "--data", str(tmp_path / "nowhere")], capsys)
    one_line_error(code, err, "--data")


@pytest.mark.skipif(not in_git_checkout(), reason="needs the git checkout (the results file tracked)")
def test_cifar_results_table_names_another_methods_model_by_its_method(cifar_results):
    rows = [dict(model="resnet32", budget=-1.0, prec1=81.99, mmac=69.124096, params=466906, command="a"),
            dict(model="pedconv_resnet32", budget=-1.0, prec1=83.0, mmac=70.183196, params=490660, command="b",
                 method="PEDConv")]
    lines = cifar_results.markdown_table(rows).splitlines()
    assert lines[2].startswith("| resnet32 | dense | 81.990 | 69.124096 | 466,906 |")
    assert lines[3].startswith("| pedconv_resnet32 | PEDConv | 83.000 | 70.183196 | 490,660 |")


def test_cifar_results_leaves_a_tracked_results_file_alone(cifar_results, tmp_path, capsys):
    path = os.path.join(ROOT, TRACKED_RESULTS)
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    code, _, err = run_entry(cifar_results.main, [SHIPPED_RUN, "--data", str(tmp_path), "--results", path], capsys)
    one_line_error(code, err, "tracked by git", "--overwrite")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


# the scripts as commands (in this process, see script())

@pytest.mark.slow
def test_speedtest_missing_checkpoint_is_one_line(tmp_path):
    done = script(SPEEDTEST, "--models", "resnet8", "--checkpoint", str(tmp_path / "missing.pth"))
    one_line_error(done.returncode, done.stderr, "missing.pth", "does not exist")
    assert done.stdout == "", "nothing is printed before the error"


@pytest.mark.slow
def test_speedtest_dense_checkpoint_asks_for_gates(tmp_path):
    path = tmp_path / "dense.pth"
    torch.save({"state_dict": create_model("resnet8").state_dict()}, path)
    done = script(SPEEDTEST, *TINY_RUN, "--checkpoint", str(path))
    one_line_error(done.returncode, done.stderr, "gates (mask units)", "static model")
    assert "--budget" not in done.stderr.replace("--budget 0.5", ""), "no advice to pass a flag speedtest lacks"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--models", "resnet8", "resnet32", "--checkpoint", "x.pth"],
                                  ["--models", "resnet8", "--checkpoint", "x.pth", "--data", "no_such_dir"],
                                  ["--threads", "0"], ["--densities", "-0.1"], ["--densities", "1.5"],
                                  ["--tiles", "4", "2"], ["--tiles", "0", "1", "1"],
                                  ["--models", "dydensenet86", "--tiles", "1"], ["--models", "resnet9"]])
def test_speedtest_bad_flags_are_one_line(argv):
    done = script(SPEEDTEST, *argv)
    one_line_error(done.returncode, done.stderr)


@pytest.mark.slow
def test_speedtest_reads_a_foreign_checkpoint_layout(tiny_cifar, tmp_path):
    """The reference's 'module.' prefix and another number of classes (read from the classifier)."""
    state = create_model("resnet8", gate_layer=MaskUnit, num_classes=3).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "trained.pth")
    done = script(SPEEDTEST, *TINY_RUN, "--checkpoint", str(tmp_path / "trained.pth"), "--data", tiny_cifar)
    assert done.returncode == 0, done.stderr[-2000:]
    assert " trained " in done.stdout


@pytest.mark.slow
def test_speedtest_hands_dgc_and_pedconv_to_their_own_benchmarks():
    done = script(SPEEDTEST, "--models", "pedconv_resnet8", "dydensenet86", "--batch-sizes", "1", "--runs", "1",
                  "--warmup", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dense ms" not in done.stdout, "no DynConv table without DynConv models"
    for path in ("per_image", "static", "grouped"):
        assert f"| 1 | pedconv_resnet8, {path} path |" in done.stdout
    assert "| 1 | resnet8 (static) | 12.501 |" in done.stdout
    assert "| dydensenet86 | 1 | 42 1x1 DGC layers |" in done.stdout and "| dydensenet86 | 1 | whole network |" in \
        done.stdout


@pytest.mark.parametrize("argv,words", [(["--models", "pedconv_resnet8", "--checkpoint", "x.pth"], ["has none"]),
                                        (["--models", "dydensenet86", "--device", "cuda"], ["own CPU benchmark"])])
def test_speedtest_own_benchmarks_refuse_what_they_cannot_do(argv, words):
    done = script(SPEEDTEST, *argv)
    one_line_error(done.returncode, done.stderr, *words)


@pytest.mark.slow
@pytest.mark.parametrize("path", [SPEEDTEST, TRAIN_SPEED, CIFAR_RESULTS])
def test_help_shows_defaults_and_examples(path):
    done = script(path, "-h")
    assert done.returncode == 0 and "default:" in done.stdout and "example" in done.stdout


@pytest.mark.slow
def test_speedtest_prints_a_compact_table_and_keeps_the_full_csv(tmp_path):
    done = script(SPEEDTEST, *TINY_RUN, "--csv", str(tmp_path / "speed.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(len(line) <= 120 for line in lines), done.stdout
    with open(tmp_path / "speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and list(rows[0]) == [
        "model", "tiles", "batch", "density", "masks", "active_fraction", "dense_ms", "masked_ms", "engine_ms",
        "dense_mmac", "sparse_mmac", "engine_mmac", "ideal_speedup", "speedup", "efficiency", "compiled_ms",
        "speedup_compiled", "efficiency_compiled"]
    assert rows[0]["compiled_ms"] == "" and "compiled" not in done.stdout  # only with --compiled-dense
    # ResNet-8's narrow blocks run densely (min_gather_width): the engine executes the dense network's MACs plus
    # the mask units' 3x3 convs, (9 C + 1) per output position: 1024 * 145 + 256 * 145 + 64 * 289 = 204,096 MACs
    assert rows[0]["tiles"] == "-"
    assert float(rows[0]["engine_mmac"]) == pytest.approx(float(rows[0]["dense_mmac"]) + 0.204096, abs=2e-3)


def test_speedtest_times_the_compiled_dense_model_when_asked(tmp_path, monkeypatch):
    """--compiled-dense: the time of what torch.compile returns for the dense model, and the engine's speedup and
    efficiency against it (the same ideal speedup as against the eager dense model), in the table and the CSV.
    torch.compile is stood in for by a wrapper that counts its calls (inductor takes ~25 s to compile ResNet-8
    here; compiling is PyTorch's part, timing what it returns is the benchmark's)."""
    compiled_calls = []

    def fake_compile(model):
        return lambda images: (compiled_calls.append(images.shape), model(images))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    done = script(SPEEDTEST, *TINY_RUN, "--compiled-dense", "--csv", str(tmp_path / "speed.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled ms" in done.stdout.splitlines()[1]
    assert compiled_calls and set(compiled_calls) == {(1, 3, 32, 32)}  # the dense model, on the row's images
    with open(tmp_path / "speed.csv") as f:
        row = next(csv.DictReader(f))
    compiled, engine, ideal = float(row["compiled_ms"]), float(row["engine_ms"]), float(row["ideal_speedup"])
    assert compiled > 0
    assert float(row["speedup_compiled"]) == pytest.approx(compiled / engine, rel=1e-2)
    assert float(row["efficiency_compiled"]) == pytest.approx(compiled / engine / ideal, rel=1e-2)


def test_speedtest_says_in_one_line_when_compiling_fails(monkeypatch):
    def failing_compile(model):
        def run(images):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(more lines)")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    done = script(SPEEDTEST, *TINY_RUN, "--compiled-dense")
    one_line_error(done.returncode, done.stderr, "--compiled-dense: torch.compile failed", "No working C++ compiler")


@pytest.mark.slow
def test_plot_from_redraws_a_csv_without_measuring(tmp_path):
    done = script(SPEEDTEST, "--plot-from", os.path.join("docs", "engine_speed_cpu.csv"), "--plot",
                  str(tmp_path / "speed.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.getsize(tmp_path / "speed.png") > 0 and "ms" not in done.stdout
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    done = script(SPEEDTEST, "--plot-from", str(tmp_path / "bad.csv"))
    one_line_error(done.returncode, done.stderr, "not a speedtest CSV")


@pytest.mark.slow
def test_train_speed_bad_flags_are_one_line(tmp_path):
    done = script(TRAIN_SPEED, "--steps", "0")
    one_line_error(done.returncode, done.stderr, "--steps")
    done = script(TRAIN_SPEED, "--csv", str(tmp_path / "no" / "x.csv"))
    one_line_error(done.returncode, done.stderr, "--csv")


@pytest.mark.slow
def test_train_speed_runs_every_kind_of_model(tmp_path):
    """DGC (against its static form, gate factor 1, and its backbone), PEDConv (dynamic weights, as it is), a DynConv
    ResNet (dense and budget 0.5): one row per variant, ratios against the reference's dense row."""
    csv_path = tmp_path / "speed.csv"
    done = script(TRAIN_SPEED, "--models", "dydensenet86", "pedconv_resnet8", "resnet8", "--reference", "resnet8",
                  "--batchsize", "2", "--steps", "1", "--warmup", "0", "--resolution", "16", "--csv", str(csv_path))
    assert done.returncode == 0, done.stderr[-2000:]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("dydensenet86", "dynamic"), ("dydensenet86", "static (gate_factor 1)"), ("dydensenet86", "backbone"),
        ("pedconv_resnet8", "dynamic"),
        ("resnet8", "dense"), ("resnet8", "DynConv 0.5")]
    ratio = "vs resnet8 dense"
    assert float(rows[4][ratio]) == 1.0
    for r in rows:
        assert float(r["img_s"]) > 0
        assert float(r[ratio]) == pytest.approx(float(r["img_s"]) / float(rows[4]["img_s"]), abs=1e-3)


@pytest.mark.slow
def test_cifar_results_evaluates_strips_and_writes_where_told(tiny_cifar, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = create_model("resnet8", gate_layer=MaskUnit, num_classes=3)
    torch.save({"state_dict": model.state_dict(), "epoch": 1, "optimizer": {"state": {}},
                "args": {"model": "resnet8", "budget": 0.5, "model_kwargs": {}}}, run_dir / "checkpoint_best.pth")
    results, png = tmp_path / "out" / "results.jsonl", tmp_path / "accuracy.png"
    done = script(CIFAR_RESULTS, str(run_dir), "--data", tiny_cifar, "--workers", "0", "--strip",
                  "--results", str(results), "--plot", str(png))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("| model | budget |") and "| resnet8 | 0.5 |" in done.stdout
    assert results.read_text().count("\n") == 1 and os.path.getsize(png) > 0
    assert "optimizer" not in torch.load(run_dir / "checkpoint_best.pth", weights_only=True)


@pytest.mark.slow
def test_cifar_results_gives_a_multi_target_run_one_row_per_budget(tiny_cifar, tmp_path):
    run_dir = tmp_path / "multi"
    run_dir.mkdir()
    model = create_model("resnet8", gate_layer=MaskUnit, num_classes=3, targets=(0.25, 0.75))
    torch.save({"state_dict": model.state_dict(), "epoch": 2,
                "args": {"model": "resnet8", "budget": -1, "budget_targets": [0.25, 0.75], "model_kwargs": {}}},
               run_dir / "checkpoint_best.pth")
    results = tmp_path / "results.jsonl"
    done = script(CIFAR_RESULTS, str(run_dir), "--data", tiny_cifar, "--workers", "0", "--fast",
                  "--results", str(results))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["budget"], r["targets"], r["epoch"]) for r in rows] == [(0.25, [0.25, 0.75], 2), (0.75, [0.25, 0.75], 2)]
    ten_classes = create_model("resnet8", gate_layer=MaskUnit, num_classes=10, targets=(0.25, 0.75))
    assert rows[0]["params"] == count_parameters(ten_classes)  # the script counts CIFAR-10's classifier
    assert all(r["engine_images_per_s"] > 0 and r["masked_images_per_s"] > 0 for r in rows)
    assert "-e --budget" not in rows[0]["command"] and "--budget 0.25 -r" in rows[0]["command"]
    assert "| resnet8 | 0.25 (multi) |" in done.stdout and "| resnet8 | 0.75 (multi) |" in done.stdout


def test_speedtest_takes_the_network_from_the_checkpoint(tmp_path):
    import torch

    from dynconv.benchmarks import speedtest as module

    path = tmp_path / "trained.pth"
    torch.save({"state_dict": {}, "args": {"model": "resnet8"}}, path)
    assert module.parse_args(["--checkpoint", str(path)]).models == ["resnet8"]
    assert module.parse_args([]).models == list(module.DEFAULT_MODELS)


def test_compare_defaults_to_every_core_whatever_torch_was_told(tmp_path, monkeypatch):
    import torch

    from dynconv.scripts import compare

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_best.pth").write_bytes(b"x")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would
    try:
        args = compare.parse_args([str(run), "--data", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert args.threads == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_a_checkpoint_stored_in_half_precision_evaluates_as_its_float32_source(tiny_cifar, tmp_path, capsys):
    """stripped() stores float16 weights over the size limit (here forced with limit 0); every reader gets float32
    back: -e gives the same Prec@1 and the identical MAC count, --teacher_weights and speedtest --checkpoint take
    it; and cifar_results --strip evaluates the file as stored."""
    import main_cifar
    from conftest import run_entry
    from dynconv.utils.checkpoint import STORED_AS, load_checkpoint, stripped

    torch.manual_seed(0)
    model = create_model("resnet8", gate_layer=MaskUnit, num_classes=3)
    source = {"state_dict": model.state_dict(), "epoch": 1, "optimizer": {"state": {}},
              "args": {"model": "resnet8", "budget": 0.5, "model_kwargs": {}}}
    torch.save(source, tmp_path / "float32.pth")
    half = stripped(source, ("state_dict", "epoch", "args"), limit=0)
    assert half[STORED_AS] == "float16" and "optimizer" not in half
    assert all(v.dtype == torch.float16 for v in half["state_dict"].values() if v.is_floating_point())
    torch.save(half, tmp_path / "float16.pth")
    assert os.path.getsize(tmp_path / "float16.pth") < 0.6 * os.path.getsize(tmp_path / "float32.pth")
    loaded = load_checkpoint(str(tmp_path / "float16.pth"))["state_dict"]
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype
        torch.testing.assert_close(loaded[key], value, rtol=1e-3, atol=1e-4)
    assert stripped(source, ("state_dict",))["state_dict"] is source["state_dict"]  # small: kept as it is

    def evaluate(name):
        code, out, err = run_entry(main_cifar.main, ["-r", str(tmp_path / name), "-e", "--data", tiny_cifar,
                                                     "--workers", "0"], capsys)
        assert code == 0, err
        return [line for line in out.splitlines() if line.startswith("* ")]

    (prec_half, macs_half), (prec_full, macs_full) = evaluate("float16.pth"), evaluate("float32.pth")
    assert prec_half == prec_full
    # the mask units decide from float16-rounded weights: a position whose logit is within rounding of 0 may flip
    # (this untrained model's logits crowd around 0; a trained one's less so)
    mmac = [float(line.split()[-2]) for line in (macs_half, macs_full)]
    assert mmac[0] == pytest.approx(mmac[1], rel=1e-3)
    teacher = {"state_dict": create_model("resnet8", num_classes=3).state_dict(), "args": {"model": "resnet8"}}
    torch.save(stripped(teacher, ("state_dict", "args"), limit=0), tmp_path / "teacher16.pth")
    code, _, err = run_entry(main_cifar.main, ["--model", "resnet8", "--budget", "0.5", "--epochs", "1",
                                               "--limit_train_batches", "1", "--data", tiny_cifar, "--workers", "0",
                                               "--teacher_model", "resnet8", "--teacher_weights",
                                               str(tmp_path / "teacher16.pth"), "-s", str(tmp_path / "student")],
                             capsys)
    assert code == 0, err
    done = script(SPEEDTEST, *TINY_RUN, "--checkpoint", str(tmp_path / "float16.pth"))
    assert done.returncode == 0, done.stderr[-2000:]


def test_train_speed_ratios_are_against_the_references_static_row():
    from dynconv.benchmarks.train_speed import with_ratios

    rows = [{"model": "dydensenet86", "variant": "dynamic", "img_s": 30.0},
            {"model": "dydensenet86", "variant": "static (gate_factor 1)", "img_s": 20.0},
            {"model": "resnet32", "variant": "dense", "img_s": 300.0},
            {"model": "resnet32", "variant": "DynConv 0.5", "img_s": 240.0}]
    assert [r["vs resnet32 dense"] for r in with_ratios(rows, "resnet32")] == [0.1, 0.067, 1.0, 0.8]
    assert [r["vs dydensenet86 static (gate_factor 1)"] for r in with_ratios(rows, "dydensenet86")] == [
        1.5, 1.0, 15.0, 12.0]
    assert [r["vs dydensenet86 dynamic"] for r in with_ratios(rows, "resnet8")] == [1.0, 0.667, 10.0, 8.0]


@pytest.mark.slow
def test_flag_errors_benchmark_times_refusals():
    # every command it times must refuse its flag in one line (else it would time something else)
    from dynconv.benchmarks.flag_errors import COMMANDS, timed
    for name, argv in COMMANDS:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        one_line_error(done.returncode, done.stderr)
    assert timed(["-c", "import sys; sys.exit(2)"])[1] == 2


@pytest.mark.parametrize("module", ["dynconv.scripts.compare", "dynconv.scripts.cifar_results"])
def test_a_bad_flag_is_answered_before_matplotlib_is_imported(module):
    # matplotlib costs ~0.4 s to import: the scripts that plot import it only when they draw
    code = (f"import runpy, sys; sys.argv = ['x', '--nope']\n"
            f"try:\n    runpy.run_module('{module}', run_name='__main__')\n"
            f"except SystemExit as e:\n    print(e.code, 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr[-2000:]


def test_a_tied_norms_run_is_counted_as_it_was_trained():
    # a multi-target run from pretrained weights shares its norms' affine parameters across the budgets; its
    # results rows count those once, as the training run printed
    from dynconv.models import build_model
    from dynconv.scripts.cifar_results import result_rows

    args = {"model": "resnet8", "budget": -1, "budget_targets": [0.25, 0.75], "model_kwargs": {}, "tied_norms": True}
    metrics = {"targets": {0.25: {"epoch": 1, "prec1": 50.0, "mmac": 5.0}, 0.75: {"epoch": 1, "prec1": 60.0,
                                                                                     "mmac": 9.0}}}
    rows = result_rows("runs/x", args, "data", metrics)
    tied = build_model("resnet8", 10, spatial_gates=True, targets=(0.25, 0.75), tied_norms=True)
    untied = build_model("resnet8", 10, spatial_gates=True, targets=(0.25, 0.75))
    assert [r["params"] for r in rows] == [count_parameters(tied)] * 2
    assert count_parameters(tied) < count_parameters(untied)


def test_values_beyond_float16s_range_stay_float32_when_stored_in_half_precision():
    """A trained DGC network had a BatchNorm running variance over 65504: in float16 it would be inf (and the
    loader refuses non-finite weights), so that tensor stays float32 and comes back exactly."""
    from dynconv.utils.checkpoint import _as_float32, stripped

    state = {"small": torch.tensor([1.5, -2.0]), "large": torch.tensor([1.0, 70000.0]), "empty": torch.zeros(0)}
    half = stripped({"state_dict": state}, ("state_dict",), limit=0)
    assert half["state_dict"]["small"].dtype == torch.float16 and half["state_dict"]["large"].dtype == torch.float32
    back = _as_float32(half)["state_dict"]
    assert torch.equal(back["large"], state["large"]) and torch.equal(back["small"], state["small"])
