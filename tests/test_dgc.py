"""Dynamic Group Convolution: the pruning schedule, kept-channel counts, the grouped heads against a per-head loop,
the channel shuffle, the engine's gathered path against the masked operator, the paper's MAC and parameter numbers,
its checkpoint layout, the lasso term by hand, and the CLI."""
import pytest
import torch
import torch.nn.functional as F

from dynconv import count_mmac, count_parameters
from dynconv.sparse.engine import SparseEngine
from dynconv.models import create_model, model_config
from dynconv.models.base import CheckpointMismatch
from dynconv.models.dgc import (LASSO_WEIGHT, DGCConv, backbone, dgc_checkpoint_filter, inactive_channels, paper_mmac,
                                shuffle_heads)
from dynconv.utils.checkpoint import load_model_state


@pytest.mark.parametrize("progress,expected", [(0.0, 0), (1 / 12, 0), (0.2, 8), (0.5, 30), (0.75, 48), (1.0, 48)])
def test_pruning_schedule(progress, expected):
    # C = 64, g = 0.25: round(48 * 1.5 * (p - 1/12)); 0.2 -> round(8.4), 0.5 -> round(30.0); 48 from p = 3/4 on
    assert inactive_channels(64, 0.25, progress) == expected


def test_schedule_moves_only_in_training():
    layer = DGCConv(64, 32, 1, heads=4, gate_factor=0.25)
    layer.gate.set_schedule(progress=0.5)
    assert int(layer.gate.inactive) == 30
    layer.eval().gate.set_schedule(progress=1.0)
    assert int(layer.gate.inactive) == 30, "evaluation keeps the trained value"


def randomised(layer, inactive):
    """A layer with non-trivial BN statistics and affine, in eval mode, dropping `inactive` channels per head."""
    torch.manual_seed(1)
    layer.norm.running_mean.normal_()
    layer.norm.running_var.uniform_(0.5, 2.0)
    layer.norm.weight.data.uniform_(0.5, 1.5)
    layer.norm.bias.data.normal_(0, 0.2)
    layer.gate.fc2_bias.data.normal_(1.0, 0.5)
    layer.gate.inactive.fill_(inactive)
    return layer.eval()


def test_each_head_keeps_all_but_the_inactive_channels():
    layer = randomised(DGCConv(24, 8, 3, heads=4), inactive=10)
    out, decision = layer(torch.randn(5, 24, 6, 6))
    assert decision.kept.shape == (5, 4, 24) and (decision.kept.sum(-1) == 14).all()
    assert out.shape == (5, 8, 6, 6)
    # MACs: 14 kept channels x 4 heads x (3 * 3 * 8 / 4) per position x 36 positions, plus the generators
    hidden = 24 // 8  # squeeze rate 16 halved below 80 channels
    generators = 4 * (hidden * 24 + 24 * hidden + 24)
    assert float(decision.macs()) == 5 * (14 * 4 * 18 * 36 + generators)


def per_head_reference(layer, x):
    """The operator written out head by head: BN + ReLU, pooled saliency, the lowest `inactive` zeroed, each head's
    own conv of the scaled input, head h's output channel j at position j * H + h."""
    heads, c_out = layer.heads, layer.out_channels
    x = F.relu(layer.norm(x))
    pooled = x.mean((2, 3))
    out = torch.empty(x.shape[0], c_out, *layer(x)[0].shape[-2:], dtype=x.dtype)
    for h in range(heads):
        hidden = F.relu(pooled @ layer.gate.fc1_weight[h].t())
        s = F.relu(hidden @ layer.gate.fc2_weight[h].t() + layer.gate.fc2_bias[h])
        inactive = int(layer.gate.inactive)
        keep = torch.ones_like(s)
        for n in range(x.shape[0]):
            if inactive:
                keep[n, s[n].argsort()[:inactive]] = 0
        s = s * keep
        w = layer.weight[h * c_out // heads:(h + 1) * c_out // heads]
        y = F.conv2d(x * s[:, :, None, None], w, stride=layer.stride, padding=layer.padding)
        out[:, h::heads] = y
    return out


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_grouped_heads_equal_a_per_head_loop(kernel, stride, layout):
    layer = randomised(DGCConv(16, 12, kernel, stride, heads=4), inactive=9).to(memory_format=layout)
    x = torch.randn(3, 16, 7, 9).contiguous(memory_format=layout)
    with torch.no_grad():
        out = layer(x)[0]
        assert torch.allclose(out, per_head_reference(layer, x), atol=1e-5)
    # a channels-last network stays channels-last through the layer (no silent conversions)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1)])
def test_gradients_equal_the_per_head_loops(kernel, stride, layout):
    # the 1x1 path and the pooling have backward passes of their own: they must give autograd's gradients of the
    # operator written out head by head, for the input, the conv weight and the saliency generators
    layer = randomised(DGCConv(16, 12, kernel, stride, heads=4), inactive=5).double().to(memory_format=layout)
    x = torch.randn(3, 16, 7, 9, dtype=torch.double).contiguous(memory_format=layout)
    upstream = torch.randn_like(layer(x)[0])
    grads = []
    for forward in (lambda v: layer(v)[0], lambda v: per_head_reference(layer, v)):
        v = x.clone().requires_grad_()
        layer.zero_grad()
        (forward(v) * upstream).sum().backward()
        grads.append([v.grad] + [p.grad.clone() for p in (layer.weight, layer.gate.fc1_weight,
                                                             layer.gate.fc2_weight, layer.gate.fc2_bias)])
    for ours, reference in zip(*grads):
        assert torch.allclose(ours, reference, atol=1e-10)


def test_backward_under_autocast():
    # --amp runs the forward in half precision; the 1x1 path's own backward must take those gradients
    layer = DGCConv(16, 12, 1, heads=4)
    x = torch.randn(3, 16, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)[0]
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    half_grad = x.grad.clone()
    x.grad = None
    layer(x)[0].sum().backward()
    assert torch.allclose(half_grad, x.grad, rtol=0.05, atol=0.05)


def test_channel_shuffle_order():
    # grouped-conv output: head 0's channels a0 a1 a2, head 1's b0 b1 b2 -> a0 b0 a1 b1 a2 b2
    grouped = torch.tensor([10., 11., 12., 20., 21., 22.]).reshape(1, 6, 1, 1)
    assert shuffle_heads(grouped, 2).flatten().tolist() == [10., 20., 11., 21., 12., 22.]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_engine_plan_equals_the_masked_operator(batch, heads, kernel, stride):
    layer = randomised(DGCConv(12, 8, kernel, stride, heads=heads), inactive=7)
    x = torch.randn(batch, 12, 7, 9).contiguous(memory_format=torch.channels_last)
    from dynconv.sparse.ops import get_ops
    from dynconv.sparse.plans import EngineSettings
    from dynconv.sparse.plans.dgc import DGCConvPlan

    with torch.no_grad():
        expected, decision = layer(x)
        out, fast_decision = DGCConvPlan(layer, get_ops("torch"), EngineSettings())(x)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert float(fast_decision.macs()) == float(decision.macs())


def trained_like(model, inactive_fraction):
    """BN statistics from a few train-mode batches (a fresh network in eval mode overflows), then pruned."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    for m in model.modules():
        if isinstance(m, DGCConv):
            m.gate.inactive.fill_(round(m.in_channels * inactive_fraction))
    return model.eval()


@pytest.mark.parametrize("name,kwargs", [("dydensenet86", dict(stages=(3, 2, 2), growth=(4, 8, 8))),
                                         ("dyresnet18", {})])
def test_engine_runs_whole_networks(name, kwargs):
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10, **kwargs), 0.6)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, decisions = model(x)
        out, fast_decisions = SparseEngine(model)(x)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert sum(float(d.macs()) for d in decisions) == sum(float(d.macs()) for d in fast_decisions)


@pytest.mark.parametrize("name,size,mmac,params", [
    ("dydensenet86", 32, 71.04, 4.265),
    pytest.param("dydensenet", 224, 549.3, None, marks=pytest.mark.slow),
    pytest.param("dyresnet18", 224, 890.4, 12.34, marks=pytest.mark.slow)])
def test_published_macs_and_parameters(name, size, mmac, params):
    """The paper's numbers (its own counter, reimplemented as dynconv.models.dgc.paper_mmac) to their printed digits."""
    model = create_model(name).eval()
    assert round(paper_mmac(model, torch.zeros(1, 3, size, size)), 2 if size == 32 else 1) == mmac
    if params is not None:
        assert round(count_parameters(model) / 1e6, 3 if size == 32 else 2) == params


def test_our_mac_count_of_a_fully_pruned_layer_by_hand():
    """Executed MACs: a 1x1 DGC 8 -> 8, 2 heads, 6 of 8 channels dropped per head, on a 4x4 map: 2 kept x 2 heads x
    4 outputs per head x 16 positions = 256, plus 2 generators of (8 -> 1 -> 8, bias): 2 x (8 + 8 + 8) = 48."""
    layer = randomised(DGCConv(8, 8, 1, heads=2, squeeze_rate=16), inactive=6)
    assert layer.gate.fc1_weight.shape == (2, 1, 8)
    _, decision = layer(torch.randn(1, 8, 4, 4))
    assert float(decision.macs()) == 256 + 48


def test_the_backbone_is_each_dgc_conv_as_a_plain_conv():
    """backbone(): BN, ReLU and the conv over every channel (no generators, no heads); its MACs are the convs'
    alone: a 1x1 8 -> 8 on a 4x4 map is 8 x 8 x 16 = 1024 per image, and the whole network counts the static
    (gate factor 1) network's MACs less its generators'."""
    layer = randomised(DGCConv(8, 8, 1, heads=2, squeeze_rate=16), inactive=0)
    plain = backbone(torch.nn.Sequential(layer))[0].eval()
    x = torch.randn(3, 8, 4, 4)
    out, decision = plain(x)
    torch.testing.assert_close(out, F.conv2d(F.relu(layer.norm.eval()(x)), layer.weight))
    assert float(decision.macs()) == 3 * 1024
    static = create_model("dydensenet86", gate_factor=1.0).eval()
    generators = sum(m.gate.generator_macs() for m in static.modules() if isinstance(m, DGCConv))
    images = torch.randn(2, 3, 32, 32)
    without = backbone(create_model("dydensenet86", gate_factor=1.0)).eval()
    assert not any(isinstance(m, DGCConv) for m in without.modules())
    assert count_mmac(without, images) == pytest.approx(count_mmac(static, images) - generators / 1e6, abs=1e-6)


def to_upstream(state, model):
    """Our state dict in the paper's layout (written independently of the filter): per-head keys, a float
    `_inactive_channels` of shape (1,), dyresnet18's downsample.0 / downsample.1.norm, a `module.` prefix."""
    out = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DGCConv)}
    for key, value in state.items():
        layer = next((n for n in layers if key.startswith(n + ".")), None)
        if layer is None:
            out[key] = value
            continue
        m, rest = layers[layer], key[len(layer) + 1:]
        upstream_layer = layer.replace("downsample.conv", "downsample.0")
        if rest.startswith("norm."):
            out[f"{upstream_layer}.{rest}"] = value
        elif rest == "gate.inactive":
            out[f"{upstream_layer}._inactive_channels"] = value.float().reshape(1)
        else:
            rows = m.out_channels // m.heads
            for h in range(m.heads):
                part = {"weight": ("conv.weight", value[h * rows:(h + 1) * rows]),
                        "gate.fc1_weight": ("fc1.weight", value[h]), "gate.fc2_weight": ("fc2.weight", value[h]),
                        "gate.fc2_bias": ("fc2.bias", value[h])}[rest]
                out[f"{upstream_layer}.headconv_{h}.{part[0]}"] = part[1]
    out = {k.replace("downsample.norm.", "downsample.1.norm."): v for k, v in out.items()}
    return {"module." + k: v for k, v in out.items()}


@pytest.mark.parametrize("name,kwargs", [("dydensenet86", dict(stages=(2, 2, 2), growth=(4, 8, 8))),
                                         ("dyresnet18", {})])
def test_upstream_layout_loads_to_the_same_function(name, kwargs):
    torch.manual_seed(0)
    source = trained_like(create_model(name, num_classes=10, **kwargs), 0.5)
    upstream = to_upstream(source.state_dict(), source)
    assert any(".headconv_3.fc2.bias" in k for k in upstream) and any("_inactive_channels" in k for k in upstream)
    if name == "dyresnet18":
        assert "module.layer2.0.downsample.1.norm.running_var" in upstream
    target = create_model(name, num_classes=10, **kwargs).eval()
    load_model_state(target, model_config(name).filter(upstream, target), "upstream")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])


def test_upstream_checkpoint_of_another_configuration_says_which_option():
    source = create_model("dydensenet86", stages=(2, 2, 2), growth=(4, 8, 8))
    target = create_model("dydensenet86", stages=(2, 2, 2), growth=(4, 8, 16))
    with pytest.raises(CheckpointMismatch, match="growth 4 8 16 expected, the checkpoint has 4 8 8"):
        dgc_checkpoint_filter(to_upstream(source.state_dict(), source), target)
    heads = create_model("dydensenet86", stages=(2, 2, 2), growth=(4, 8, 8), heads=2)
    with pytest.raises(CheckpointMismatch, match="heads 2 expected, the checkpoint has 4"):
        dgc_checkpoint_filter(to_upstream(source.state_dict(), source), heads)


def test_lasso_term_by_hand():
    layer = DGCConv(16, 8, 1, heads=2)
    layer.gate.inactive.fill_(5)
    x = torch.randn(3, 16, 4, 4)
    _, decision = layer(x)
    pooled = F.relu(layer.norm(x)).mean((2, 3))
    total = 0.0
    for h in range(2):
        hidden = F.relu(pooled @ layer.gate.fc1_weight[h].t())
        raw = F.relu(hidden @ layer.gate.fc2_weight[h].t() + layer.gate.fc2_bias[h])
        total = total + raw.mean()  # before zeroing
    assert decision.loss.item() == pytest.approx(LASSO_WEIGHT * total.item(), rel=1e-6)
    assert LASSO_WEIGHT == 1e-5


@pytest.mark.parametrize("args,message", [
    (dict(in_channels=10, out_channels=8, kernel_size=1, heads=4), "heads must divide"),
    (dict(in_channels=8, out_channels=8, kernel_size=1, gate_factor=0.0), "gate factor must lie in (0, 1]"),
    (dict(in_channels=8, out_channels=8, kernel_size=1, gate_factor=1.5), "gate factor must lie in (0, 1]")])
def test_bad_operator_options(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        DGCConv(**args)


def test_cli_trains_resumes_evaluates_and_plots_both_models(tmp_path, capsys):
    """Each model through its entry script on a tiny image folder: 1 epoch, then resumed to 2 (the pruning has
    begun: progress passes 1/12 in the first epoch), -e with the engine (same Prec@1), the paper's MAC line and
    the channel-selection plot."""
    import os

    import main_cifar
    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), classes=2, per_class=6, size=32)
    small = {"dydensenet86": (main_cifar, ["--stages", "2", "2", "2", "--growth", "4", "8", "8"]),
             "dyresnet18": (main_imagenet, ["--resolution", "32", "--gate_factor", "0.5"])}
    for name, (entry, options) in small.items():
        run_dir = str(tmp_path / name)
        common = ["--model", name, "--data", root, "--workers", "0", "--batchsize", "4", "-s", run_dir] + options
        for epochs in ("1", "2"):
            code, out, err = run_entry(entry.main, common + ["--epochs", epochs, "-r", run_dir], capsys)
            assert code == 0, err
        assert "resuming" not in out and "training epochs 2-2" in out
        code, out, err = run_entry(entry.main, ["-r", run_dir, "-e", "--fast", "--plot_ponder", "--data", root,
                                                "--workers", "0"] + options[:2 if name == "dyresnet18" else 0],
                                   capsys)
        assert code == 0, err
        assert "* FLOPS as the DGC paper counts them:" in out and "sparse engine" in out
        assert os.path.getsize(os.path.join(run_dir, "ponder", "channels.png")) > 10_000


@pytest.mark.parametrize("flags,words", [
    (["--model", "dydensenet86", "--heads", "3"], ["heads must divide"]),
    (["--model", "dydensenet86", "--gate_factor", "1.5"], ["gate factor must lie in (0, 1]"]),
    (["--model", "dydensenet86", "--budget", "0.5"], ["--budget", "do not apply to dydensenet86"]),
    (["--model", "resnet8", "--heads", "2"], ["--heads does not apply to resnet8"])])
def test_cli_bad_options_are_one_line(tmp_path, capsys, flags, words):
    import main_cifar
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), classes=2, per_class=2, size=32)
    code, _, err = run_entry(main_cifar.main, flags + ["--data", root, "--workers", "0", "--epochs", "1",
                                                       "-s", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err


def test_ties_at_zero_saliency_cost_the_channels_read_and_compute_the_same_function():
    """Half the channels score 0 (ReLU): the paper's rule zeroes every score <= the inactive-th smallest (0 here), so
    fewer than C - inactive channels count; a head still reads (and pays for) C - inactive, the extra ones at 0."""
    from dynconv.sparse.ops import get_ops
    from dynconv.sparse.plans import EngineSettings
    from dynconv.sparse.plans.dgc import DGCConvPlan

    layer = randomised(DGCConv(16, 8, 3, heads=2), inactive=4)
    layer.gate.fc2_bias.data[:, ::2] = -50.0  # channels 0, 2, ... score 0 for every image
    x = torch.randn(3, 16, 5, 5)
    with torch.no_grad():
        expected, decision = layer(x)
        out, _ = DGCConvPlan(layer, get_ops("torch"), EngineSettings())(x.contiguous(memory_format=torch.channels_last))
    assert (decision.kept.sum(-1) == 12).all()
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.allclose(expected, per_head_reference(layer, x), atol=1e-5)


def test_cli_evaluates_an_upstream_checkpoint_file(tmp_path, capsys):
    """The paper's file format ({'epoch', 'state_dict', 'best_prec1', 'optimizer'}, `module.` keys, per-head
    layout) through `-r FILE -e`; another configuration's file is one line naming the option."""
    import main_cifar
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), classes=2, per_class=2, size=32)
    options = dict(stages=(2, 2, 2), growth=(4, 8, 8))
    source = trained_like(create_model("dydensenet86", num_classes=2, **options), 0.75)
    path = str(tmp_path / "cifar10_dydensenet86_h4.tar")
    torch.save({"epoch": 300, "state_dict": to_upstream(source.state_dict(), source), "best_prec1": 95.23,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}, path)
    flags = ["--stages", "2", "2", "2", "--data", root, "--workers", "0"]
    code, out, err = run_entry(main_cifar.main, ["--model", "dydensenet86", "--growth", "4", "8", "8", "-r", path,
                                                 "-e"] + flags, capsys)
    assert code == 0, err
    assert "* Epoch 300 - Prec@1" in out and "* FLOPS as the DGC paper counts them:" in out
    code, _, err = run_entry(main_cifar.main, ["--model", "dydensenet86", "--growth", "4", "8", "16", "-r", path,
                                               "-e"] + flags, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "growth 4 8 16 expected, the checkpoint has 4 8 8" in lines[0], err
