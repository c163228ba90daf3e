"""Multi-target models (the budget-aware paper's): each budget has its own mask units and, in ResNets, its own
block norms; everything else is shared. Checked against single-budget models holding one budget's weights
(logits, masks and MACs equal), through the sparse engine per budget, and the per-target layer's rules."""
import re

import pytest
import torch

from dynconv import MaskUnit, count_mmac, count_parameters
from dynconv.multitarget import PerTarget, model_targets, per_target, target_key
from dynconv.sparse.engine import SparseEngine
from dynconv.models import create_model

BUDGETS = (0.25, 0.5, 0.75)
MODELS = [("resnet8", 32), ("resnet18", 64), pytest.param("resnet50", 64, marks=pytest.mark.slow), ("convnext_atto", 64)]


def randomised(model):
    """Eval mode with BatchNorm statistics and affine parameters away from their initial values, so that a
    wrong norm or gate shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def single_budget_state(multi_state, budget):
    """The state dict of the single-budget model of `budget`: its variants renamed, the other budgets' dropped
    (a second implementation of the key layout: `<layer>.<key>.` -> `<layer>.`)."""
    keys = {target_key(b) for b in BUDGETS}
    out = {}
    for key, value in multi_state.items():
        match = re.search(r"\.(bn\d|masker)\.(\d+)\.", key)
        if match is None:
            out[key] = value
        elif match.group(2) == target_key(budget):
            out[key.replace(match.group(0), f".{match.group(1)}.")] = value
        else:
            assert match.group(2) in keys, key
    return out


@pytest.mark.parametrize("name,size", MODELS)
def test_each_budget_is_the_single_budget_model_with_its_weights(name, size):
    torch.manual_seed(0)
    multi = randomised(create_model(name, gate_layer=MaskUnit, targets=BUDGETS, num_classes=10))
    assert model_targets(multi) == BUDGETS
    x = torch.randn(2, 3, size, size)
    logits_per_budget = []
    for budget in BUDGETS:
        single = create_model(name, gate_layer=MaskUnit, num_classes=10).eval()
        single.load_state_dict(single_budget_state(multi.state_dict(), budget))
        with torch.no_grad():
            logits, decisions = multi(x, target=budget)
            expected, expected_decisions = single(x)
        torch.testing.assert_close(logits, expected)
        assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
        assert count_mmac(multi, x, target=budget) == pytest.approx(count_mmac(single, x))
        logits_per_budget.append(logits)
    # the budgets' own gates (and norms) make a difference: no two budgets give the same logits
    assert not torch.allclose(logits_per_budget[0], logits_per_budget[1])


def test_only_gates_and_block_norms_are_per_budget():
    multi = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS)
    keys = multi.state_dict().keys()
    per_budget = {k for k in keys if re.search(r"\.(bn\d|masker)\.\d+\.", k)}
    assert "layer2.0.bn1.025.running_mean" in per_budget and "layer2.0.masker.075.maskconv.conv.weight" in keys
    assert {"conv1.weight", "bn1.weight", "layer2.0.conv1.weight", "layer2.0.downsample.1.running_var",
            "fc.weight"} <= set(keys) - per_budget  # stem, convs, downsample (with its BN), classifier: shared
    single = create_model("resnet8", gate_layer=MaskUnit)
    norms = sum(p.numel() for n, p in single.named_parameters() if re.search(r"\.bn\d\.", n))
    gates = sum(p.numel() for n, p in single.named_parameters() if ".masker." in n)
    assert count_parameters(multi) == count_parameters(single) + 2 * (norms + gates)


def test_convnext_tiny_pays_66276_parameters_per_budget():
    """The issue's number: a mask unit per block per budget (about 10 C + 2 each), the norms shared."""
    dense = count_parameters(create_model("convnext_tiny"))
    for budgets in ((0.5,), (0.3, 0.5, 0.7)):
        multi = create_model("convnext_tiny", gate_layer=MaskUnit, targets=budgets)
        assert count_parameters(multi) - dense == 66_276 * len(budgets)


@pytest.mark.parametrize("name,size", MODELS[1:])
def test_the_engine_runs_every_budget(name, size):
    torch.manual_seed(0)
    multi = randomised(create_model(name, gate_layer=MaskUnit, targets=BUDGETS, num_classes=10))
    multi = multi.to(memory_format=torch.channels_last)
    engine = SparseEngine(multi, backend="torch", dense_above=1.1, gather_overhead_macs=0, min_gather_width=0)
    x = torch.randn(2, 3, size, size)
    for budget in BUDGETS[::-1] + BUDGETS:  # each budget after another one: nothing of the last one sticks
        with torch.no_grad():
            expected, expected_decisions = multi(x, target=budget)
            got, decisions = engine(x, target=budget)
        assert all(torch.equal(a.hard, b.hard) for a, b in zip(decisions, expected_decisions))
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_per_target_layers():
    assert [target_key(b) for b in (0.3, 0.25, 0.5, 1)] == ["03", "025", "05", "10"]
    with pytest.raises(ValueError, match="distinct targets"):
        PerTarget({0.5: torch.nn.BatchNorm2d(4), "0.5": torch.nn.BatchNorm2d(4)})
    norms = per_target(torch.nn.BatchNorm2d, (0.3, 0.5))(4)
    with pytest.raises(ValueError, match="no operating point 0.4; this model has 0.3, 0.5"):
        norms.select(0.4)
    assert norms.variant(0.3).weight is not norms.variant(0.5).weight
    norms.tie_affine()
    assert norms.variant(0.3).weight is norms.variant(0.5).weight  # one Parameter ...
    assert norms.variant(0.3).running_mean is not norms.variant(0.5).running_mean  # ... own statistics
    with pytest.raises(ValueError, match="needs a gate_layer"):
        create_model("resnet8", targets=(0.5,))


def test_a_call_leaves_no_target_selected_behind():
    """model(x, target=b) runs budget b and restores the selection: a later call without a target runs the first
    budget, as it did before (the selection is scoped to the call, also when the call fails)."""
    torch.manual_seed(0)
    model = create_model("resnet8", gate_layer=MaskUnit, targets=(0.25, 0.75)).eval()
    for m in model.modules():  # budgets that differ: per-budget norms with other statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, _ = model(x)
        other, _ = model(x, target=0.75)
        again, _ = model(x)
        assert not torch.equal(first, other) and torch.equal(first, again)
        assert torch.equal(model(x, target=0.25)[0], first)
        with pytest.raises(ValueError, match="no operating point 0.5"):
            model(x, target=0.5)
        assert torch.equal(model(x)[0], first)
    assert {m.selected for m in model.modules() if isinstance(m, PerTarget)} == {0.25}


@pytest.mark.parametrize("metric,accuracies,expected", [
    ("l2", {0.3: 67.0, 0.5: 71.0}, {0.3: 1.8, 0.5: 0.2}),  # r = 9, 1: w = 2 * 9 / 10, 2 * 1 / 10
    ("l1", {0.3: 63.0, 0.5: 73.0}, {0.3: 2.0, 0.5: 0.0}),  # r = 0.1, max(0, 1 - 73 / 72) = 0
    ("none", {0.3: 63.0, 0.5: 73.0}, {0.3: 1.0, 0.5: 1.0}),
    ("l2", {0.3: 70.0, 0.5: 72.0}, {0.3: 1.0, 0.5: 1.0}),  # both on target: sum(r) = 0, equal weights
])
def test_budget_awareness_weights_by_hand(metric, accuracies, expected):
    from dynconv.objectives import BudgetAwareness, StepOutput

    awareness = BudgetAwareness((0.3, 0.5), metric, {0.3: 70.0, 0.5: 72.0})
    assert awareness.weights == {0.3: 1.0, 0.5: 1.0}  # before the first validation
    awareness.update(accuracies)
    for budget, weight in expected.items():
        step = StepOutput(None, None, [], None, 1.0, target=budget)
        assert awareness(step) == pytest.approx(weight)


def test_distillation_and_the_weighted_loss_by_hand():
    """KD = KL(softmax(t / T) || softmax(s / T)) T^2: for s = (1, 0), t = (0, 1), T = 2 the two distributions are
    (sigmoid(0.5), sigmoid(-0.5)) and its reverse, so KL = (sigmoid(0.5) - sigmoid(-0.5)) * 0.5. The loss of a step
    is w_b times the sum of its terms; the sparsity term takes the step's budget."""
    import math

    from dynconv.objectives import Distillation, Loss, Sparsity, StepOutput
    from dynconv.loss import SparsityCriterion

    class Teacher(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[0.0, 1.0]])

    teacher = Teacher()
    step = StepOutput(None, torch.tensor([[1.0, 0.0]]), [], None, 0.0, target=0.5)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    kd = 4 * (sigmoid(0.5) - sigmoid(-0.5)) * 0.5
    assert Distillation(teacher, temperature=2.0, weight=1.0)(step).item() == pytest.approx(kd)
    total, values = Loss([Distillation(teacher, 2.0, 0.01)], weight=lambda s: 1.5)(step)
    assert total.item() == pytest.approx(1.5 * 0.01 * kd) and values["loss_weight"].item() == 1.5

    model = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS).train()
    _, decisions = model(torch.randn(2, 3, 16, 16), target=0.25)
    step = StepOutput(None, None, decisions, None, 3.0, target=0.25)
    loss, _ = Sparsity(None, 10)(step)
    torch.testing.assert_close(loss, SparsityCriterion(0.25, 10)(decisions, 3)[0])


def _upstream_keys(state_dict):
    """Our multi-target keys in the budget-aware code's layout: <bnK>.BB. -> <bnK>_BB., masker.BB. -> maskerBB."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"\.(bn\d|norm)\.(\d+)\.", r".\1_\2.", key)
        out[re.sub(r"\.masker\.(\d+)\.", r".masker\1.", key)] = value
    return out


def test_budget_aware_codes_resnet_checkpoint_evaluates_like_ours(tiny_cifar, tmp_path, capsys):
    """Its keys (layerX.Y.maskerBB.*, layerX.Y.bnK_BB.*, the never-called shared bnK.* beside them) and its dict
    (no args; each budget's best Prec@1 under the float budget) give the same lines under -e as our checkpoint
    of the same weights, every budget read from the checkpoint without --budget_targets."""
    import main_cifar
    from conftest import run_entry

    torch.manual_seed(0)
    multi = randomised(create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS, num_classes=3))
    ours, theirs = str(tmp_path / "ours.pth"), str(tmp_path / "theirs.pth")
    torch.save({"state_dict": multi.state_dict(), "epoch": 5, "args": {
        "model": "resnet8", "budget": -1, "budget_targets": list(BUDGETS), "model_kwargs": {}}}, ours)
    upstream = _upstream_keys(multi.state_dict())
    shared = {k.replace(".bn1.025.", ".bn1."): torch.zeros_like(v) for k, v in multi.state_dict().items()
              if ".bn1.025." in k}  # the shared norms: init values upstream, never used by its sparse forward
    assert "layer1.0.bn1_025.running_var" in upstream and "layer1.0.masker075.maskconv.fc.bias" in upstream
    torch.save({"state_dict": {**upstream, **shared}, "optimizer": {}, "epoch": 5, "best_prec1": 60.0,
                **{b: 50.0 + b for b in BUDGETS}}, theirs)
    outputs = []
    for path in (ours, theirs):
        code, out, err = run_entry(main_cifar.main, ["--model", "resnet8", "-r", path, "-e", "--data", tiny_cifar,
                                                     "--workers", "0"], capsys)
        assert code == 0, err
        outputs.append([line for line in out.splitlines() if line.startswith("[budget")])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2 * len(BUDGETS)
    assert [line.split("]")[0] for line in outputs[0][::2]] == ["[budget 0.25", "[budget 0.5", "[budget 0.75"]


def test_budget_aware_codes_convnext_and_single_budget_weights_load():
    """ConvNeXt: stages.i.j.maskerBB.* and the per-budget LayerNorm copies norm_BB.* (the same tensors as norm)
    in the official layout load into ours; a single-budget checkpoint's gate and norms start every budget."""
    from dynconv.models import model_config
    from test_convnext import _official_keys
    from dynconv.utils.checkpoint import load_model_state

    torch.manual_seed(0)
    multi = create_model("convnext_atto", gate_layer=MaskUnit, targets=(0.3, 0.5))
    official = _upstream_keys(_official_keys(multi.state_dict()))
    official.update({k.replace(".norm.", ".norm_03."): v for k, v in official.items() if re.search(r"\.\d+\.norm\.", k)})
    assert "stages.1.0.masker05.maskconv.conv.weight" in official and "stages.1.0.norm_03.weight" in official
    loaded = create_model("convnext_atto", gate_layer=MaskUnit, targets=(0.3, 0.5))
    load_model_state(loaded, model_config("convnext_atto").filter(official, loaded), "upstream")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in multi.state_dict().items())

    single = randomised(create_model("resnet8", gate_layer=MaskUnit))
    multi = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS)
    load_model_state(multi, model_config("resnet8").filter(single.state_dict(), multi), "single")
    for budget in BUDGETS:
        state = single_budget_state(multi.state_dict(), budget)
        assert all(torch.equal(state[k], v) for k, v in single.state_dict().items())


@pytest.mark.slow
def test_cli_trains_with_a_teacher_resumes_evaluates_every_budget_and_plots(tiny_cifar, tmp_path, capsys):
    """A tiny multi-target run: a dense teacher first, then budgets 0.25/0.5/0.75 distilled from it with l2
    awareness (targets from a CSV), stopped after epoch 1 and resumed; -e prints every budget, --budget one,
    --plot_ponder draws the budgets side by side; per-budget metrics and weights reach log.jsonl."""
    import json
    import os

    import main_cifar
    from conftest import run_entry
    from dynconv.utils.checkpoint import load_checkpoint

    common = ["--model", "resnet8", "--batchsize", "8", "--workers", "0", "--data", tiny_cifar]
    teacher = str(tmp_path / "teacher")
    assert run_entry(main_cifar.main, common + ["--epochs", "1", "-s", teacher], capsys)[0] == 0
    csv_path = tmp_path / "targets.csv"
    csv_path.write_text("model,0.25,0.5,0.75,1\nresnet8,40,50,60,70\n")
    run_dir = str(tmp_path / "multi")
    train = common + ["--budget_targets", *map(str, BUDGETS), "--teacher_weights",
                      os.path.join(teacher, "checkpoint_best.pth"), "--awareness_metric", "l2",
                      "--performance_targets_csv", str(csv_path), "-s", run_dir, "-r", run_dir]
    code, out, err = run_entry(main_cifar.main, train + ["--epochs", "1"], capsys)
    assert code == 0, err
    assert "=> distilling from resnet8" in out and "budget awareness: l2 against Prec@1 targets 0.25: 40" in out
    weights = load_checkpoint(os.path.join(run_dir, "checkpoint.pth"))["awareness_weights"]
    assert sum(weights.values()) == pytest.approx(3.0)
    code, out, err = run_entry(main_cifar.main, train + ["--epochs", "2"], capsys)
    assert code == 0, err
    assert "[budget 0.75] * Epoch 2 - Prec@1" in out and "* Epoch 1 " not in out
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        train_logs = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert {"kd_loss@0.25", "sparsity_loss@0.5", "loss_weight@0.75", "task_loss"} <= set(train_logs[-1])

    code, out, err = run_entry(main_cifar.main, common + ["-r", run_dir, "-e"], capsys)
    assert code == 0, err
    for budget in BUDGETS:
        assert f"[budget {budget:g}] * Epoch 2 - Prec@1" in out
        assert f"[budget {budget:g}] * FLOPS (multiply-accumulates, MACs) per image:" in out
    code, out, err = run_entry(main_cifar.main, common + ["-r", run_dir, "-e", "--budget", "0.5"], capsys)
    assert code == 0 and "[budget 0.5]" in out and "[budget 0.25]" not in out
    plots = str(tmp_path / "ponder")
    code, out, err = run_entry(main_cifar.main, common + ["-r", run_dir, "-e", "--plot_ponder", "--plot_only",
                                                          "--plot_count", "1", "--plot_dir", plots], capsys)
    assert code == 0, err
    assert os.listdir(plots) == ["000.png"]


@pytest.mark.parametrize("flags,message", [
    (["--budget_targets", "0.5", "0.5"], "--budget_targets has a budget twice"),
    (["--budget_targets", "0.5", "1.2"], "--budget_targets must lie in [0, 1]"),
    (["--budget_targets", "0.5", "0.7", "--budget", "0.5"], "--budget names one budget"),
    (["--budget_targets", "0.3", "0.5", "--awareness_metric", "l1"], "has no targets for resnet8"),
    (["--budget_targets", "0.3", "0.4", "--awareness_metric", "l2", "--performance_targets_csv", "CSV"],
     "has no target for resnet8 at budget 0.4"),
    (["--budget_targets", "0.3", "--teacher_weights", "TEACHER"], "classifies 10 classes, the data set has 3"),
    (["--budget_targets", "0.3", "--teacher_model", "resnet9000"], "--teacher_model resnet9000 is not a model"),
    (["--budget_targets", "0.3", "--teacher_model", "resnet8"], "has no published weights"),
])
def test_bad_multi_target_input_is_one_line_and_exit_2(flags, message, tiny_cifar, tmp_path, capsys):
    import main_cifar
    from conftest import run_entry

    (tmp_path / "targets.csv").write_text("model,0.3,0.5\nresnet8,40,50\n")
    teacher = str(tmp_path / "teacher.pth")
    torch.save(create_model("resnet8").state_dict(), teacher)  # a 10-class dense resnet8
    flags = [{"CSV": str(tmp_path / "targets.csv"), "TEACHER": teacher}.get(f, f) for f in flags]
    code, _, err = run_entry(main_cifar.main, ["--model", "resnet8", "--data", tiny_cifar, "--workers", "0",
                                               "--epochs", "1", "-s", str(tmp_path / "run")] + flags, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_budget_the_checkpoint_was_not_trained_for_lists_them(tiny_cifar, tmp_path, capsys):
    import main_cifar
    from conftest import run_entry

    path = str(tmp_path / "multi.pth")
    torch.save({"state_dict": create_model("resnet8", gate_layer=MaskUnit, targets=(0.3, 0.5), num_classes=3)
                .state_dict(), "epoch": 1, "args": {"model": "resnet8", "budget": -1, "budget_targets": [0.3, 0.5],
                                                   "model_kwargs": {}}}, path)
    code, _, err = run_entry(main_cifar.main, ["-r", path, "-e", "--budget", "0.4", "--data", tiny_cifar,
                                               "--workers", "0"], capsys)
    assert code == 2 and "--budget 0.4 is not one of this model's budgets (0.3, 0.5)" in err


def test_speedtest_measures_every_budget_of_a_multi_target_checkpoint(tmp_path):
    import csv

    from conftest import run_command

    torch.manual_seed(0)
    path, out_csv = str(tmp_path / "multi.pth"), str(tmp_path / "speed.csv")
    torch.save({"state_dict": randomised(create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS)).state_dict(),
                "args": {"model": "resnet8", "budget": -1, "budget_targets": list(BUDGETS)}}, path)
    done = run_command("dynconv.benchmarks.speedtest", "--models", "resnet8", "--checkpoint", path, "--batch-sizes",
                       "2", "--runs", "1", "--warmup", "0", "--csv", out_csv)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [r["density"] for r in rows] == ["trained@0.25", "trained@0.5", "trained@0.75"]
    assert all(float(r["dense_mmac"]) == pytest.approx(12.500992, abs=1e-3) for r in rows)  # resnet8, 32x32
    assert len({r["sparse_mmac"] for r in rows}) == 3  # each budget its own masks


def test_target_state_is_one_budgets_single_target_state():
    from dynconv.multitarget import target_state

    multi = randomised(create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS))
    for budget in BUDGETS:
        got, expected = target_state(multi.state_dict(), multi, budget), single_budget_state(multi.state_dict(), budget)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_minibatches_train_the_budgets_round_robin():
    from types import SimpleNamespace

    from dynconv.models import model_config
    from dynconv.utils.cli import RECIPE_DEFAULTS
    from dynconv.utils.distributed import DistContext
    from dynconv.utils.fit import build_setup

    args = SimpleNamespace(**dict(RECIPE_DEFAULTS, **model_config("resnet8").recipe), budget=-1, model="resnet8",
                           budget_targets=list(BUDGETS), amp=False)
    model = create_model("resnet8", gate_layer=MaskUnit, targets=BUDGETS)
    setup = build_setup(model, args, 10, updates_per_epoch=10, ctx=DistContext())
    assert [setup.choose_target(i) for i in range(7)] == [0.25, 0.5, 0.75, 0.25, 0.5, 0.75, 0.25]
    assert setup.awareness.metric == "none" and setup.loss.weight is setup.awareness  # no targets for resnet8
