"""PEDConv: the rank-R kernel against explicit outer products, the grouped-over-batch conv against a per-image loop,
the static-weight path against the grouped one, noise and the decoder loss only in training (the loss by hand),
the paper's parameter counts, MACs by hand, its checkpoint layout, and numpy scalars in its optimizer state."""
import pytest
import torch
import torch.nn.functional as F

from dynconv import count_mmac, count_parameters
from dynconv.models import create_model, model_config
from dynconv.models.pedconv import DECODER_WEIGHT, NOISE_STD, PEDConv
from dynconv.utils.checkpoint import load_checkpoint, load_model_state


def layer(in_channels=32, out_channels=6, kernel_size=3, stride=1, groups=1, rank=1, inference="static"):
    torch.manual_seed(0)
    conv = PEDConv(in_channels, out_channels, kernel_size, stride, groups, rank, inference)
    for m in conv.attn.modules():  # attention vectors well away from 0.5, so that mistakes show
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.5)
            torch.nn.init.normal_(m.bias, 0, 0.5)
    return conv


@pytest.mark.parametrize("rank", [1, 3])
def test_kernel_is_w_times_the_sum_of_outer_products(rank):
    conv = layer(rank=rank).eval()
    a_in, a_out, a_k, _ = conv.attn(torch.randn(2, 32, 5, 5))
    kernels = conv.kernels(a_in, a_out, a_k)
    for n in range(2):
        expected = torch.zeros_like(conv.weight)
        for r in range(rank):
            for o in range(6):
                for i in range(32):
                    expected[o, i] += a_out[n, r, o] * a_in[n, r, i] * a_k[n, r].view(3, 3)
        assert torch.allclose(kernels[n], conv.weight * expected, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_over_batch_equals_a_per_image_loop(groups):
    conv = layer(groups=groups).eval()
    x = torch.randn(3, 32, 7, 9)
    a_in, a_out, a_k, _ = conv.attn(x)
    kernels = conv.kernels(a_in, a_out, a_k)
    out = conv.grouped(x, a_in, a_out, a_k)
    for n in range(3):
        one = F.conv2d(x[n:n + 1], kernels[n], None, 1, 1, groups=groups)
        assert torch.allclose(out[n:n + 1], one, atol=1e-5)


@pytest.mark.parametrize("path", ["static", "per_image"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups,rank", [(1, 1), (2, 1), (1, 2)])
def test_fast_paths_equal_the_grouped_path(path, batch, stride, groups, rank):
    conv = layer(stride=stride, groups=groups, rank=rank, inference=path).eval()
    x = torch.randn(batch, 32, 7, 9)
    with torch.no_grad():
        fast = conv(x)
        conv.inference = "grouped"
        grouped = conv(x)
    assert fast.shape == grouped.shape == (batch, 6, 4 if stride == 2 else 7, 5 if stride == 2 else 9)
    assert (fast - grouped).abs().max() <= 1e-4 * grouped.abs().max()


def test_noise_and_decoder_loss_only_in_training():
    conv = layer()
    x = torch.randn(4, 32, 5, 5)
    conv.eval()
    first, second = conv(x), conv(x)
    assert torch.equal(first, second) and conv.recorded.loss is None
    conv.train()
    torch.manual_seed(1)
    noisy = conv(x)
    loss = conv.recorded.loss
    assert not torch.allclose(noisy, first)
    # the loss by hand: the same noise drawn again, the decoder on the noisy z's, MSE against the pooled input
    torch.manual_seed(1)
    pooled = x.mean((2, 3))
    hidden = F.relu(conv.attn.fc_share(pooled))
    z = [fc(hidden) for fc in (conv.attn.fc_inp, conv.attn.fc_oup, conv.attn.fc_k)]
    z = [v + NOISE_STD * torch.randn_like(v) for v in z]
    expected = ((conv.attn.decoder(torch.cat(z, 1)) - pooled) ** 2).mean() * DECODER_WEIGHT
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert DECODER_WEIGHT == 0.001 and NOISE_STD == 0.1


def test_parameter_counts_of_the_paper():
    model = create_model("pedconv_resnet18")
    decoders = sum(p.numel() for name, p in model.named_parameters() if ".decoder." in name)
    assert count_parameters(model) == 12_140_744
    assert count_parameters(model) - decoders == 11_917_120


def test_macs_of_one_layer_by_hand():
    """32 -> 6, 3x3, stride 1, on 5x5: the conv 6 * 32 * 9 per position; generators fc_share 32 -> 2 and the heads
    2 -> 32, 6, 9, with biases; static path: the scale vector (32 * 9), the scaled neighbourhoods (32 * 9 per
    position) and outputs (6 per position); grouped: a_out (x) a_in (6 * 32), then (x) a_k and W times it."""
    conv = layer().eval()
    x = torch.randn(1, 32, 5, 5)
    conv(x)
    generators = (32 * 2 + 2) + (2 * 32 + 32) + (2 * 6 + 6) + (2 * 9 + 9)
    conv_macs = 6 * 32 * 9 * 25
    static = 32 * 9 + 32 * 9 * 25 + 6 * 25
    assert conv.recorded.macs() == conv_macs + generators + static
    conv.inference = "grouped"
    conv(x)
    assert conv.recorded.macs() == conv_macs + generators + (6 * 32 + 6 * 32 * 9) + 6 * 32 * 9
    conv.inference = "per_image"  # the input (32 * 25), W by the taps (6 * 32 * 9), the output (6 * 25)
    conv(x)
    assert conv.recorded.macs() == conv_macs + generators + 32 * 25 + 6 * 32 * 9 + 6 * 25


def set_path(model, path):
    for m in model.modules():
        if isinstance(m, PEDConv):
            m.inference = path
    return model


def test_resnet18_macs_of_every_path_and_the_static_resnet():
    x = torch.randn(1, 3, 224, 224)
    model = create_model("pedconv_resnet18").eval()
    per_image = count_mmac(model, x)
    static = count_mmac(set_path(model, "static"), x)
    grouped = count_mmac(set_path(model, "grouped"), x)
    dense = count_mmac(create_model("resnet18").eval(), x)
    assert dense == pytest.approx(1813.561344, abs=5e-7)
    convs = [m for m in model.modules() if isinstance(m, PEDConv)]
    # assembling kernels: per conv a_out (x) a_in (C_out * C_in), (x) a_k and W times it (2 per kernel element)
    assembly = sum(c.weight.numel() // 9 + 2 * c.weight.numel() for c in convs)
    generators = sum(fc.weight.numel() + fc.bias.numel() for c in convs
                     for fc in (c.attn.fc_share, c.attn.fc_inp, c.attn.fc_oup, c.attn.fc_k))
    assert assembly == 23_191_552  # 2 x 10,985,472 3x3 weights + 1,220,608: the paper's ~22 M per image
    assert grouped - dense == pytest.approx((assembly + generators) / 1e6, abs=1e-6)
    # per_image: W by the taps (one per weight), the input and the output maps by the channel factors
    sizes = {}
    hooks = [c.register_forward_hook(lambda m, args, out: sizes.__setitem__(m, (args[0][0].numel(), out[0].numel())))
             for c in convs]
    model(x)
    for hook in hooks:
        hook.remove()
    maps = sum(sum(sizes[c]) for c in convs)
    weights = sum(c.weight.numel() for c in convs)
    assert per_image - dense == pytest.approx((weights + maps + generators) / 1e6, abs=1e-6)
    assert dense < per_image < static < grouped


def to_upstream(model):
    """The paper's file: our keys are its keys (convK.weight, convK.attn.*, bnK, downsample.{0,1}, fc) behind
    DataParallel's `module.` prefix."""
    return {"module." + k: v for k, v in model.state_dict().items()}


def test_upstream_layout_loads_to_the_same_function():
    source = create_model("pedconv_resnet18", num_classes=10).eval()
    upstream = to_upstream(source)
    assert "module.layer1.0.conv1.attn.decoder.2.weight" in upstream and "module.layer2.0.downsample.1.weight" in upstream
    target = create_model("pedconv_resnet18", num_classes=10).eval()
    load_model_state(target, model_config("pedconv_resnet18").filter(upstream, target), "upstream")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x)[0], source(x)[0])


def test_checkpoint_with_numpy_learning_rates_loads_without_unrestricted_unpickling(tmp_path):
    """The paper's optimizer state holds numpy float64 learning rates: weights_only loading allows just those."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "pedconv_resnet18.pth.tar"
    torch.save({"epoch": 250, "arch": "resnet18", "state_dict": {"module.fc.weight": torch.zeros(2, 2)},
                "best_prec1": 74.1, "optimizer": {"param_groups": [{"lr": np.float64(0.256)}], "state": {}}}, path)
    checkpoint = load_checkpoint(str(path))
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.256)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": np.random.default_rng(0)}, evil)  # an arbitrary object: refused
    from dynconv.utils.errors import UserError
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(evil))


@pytest.mark.parametrize("kwargs,message", [(dict(rank=0), "rank must be at least 1"),
                                            (dict(groups=3), "3 groups must divide"),
                                            (dict(inference="fast"), "inference must be one of")])
def test_bad_operator_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(**kwargs)


def test_pedconv_and_static_checkpoints_do_not_load_into_each_other_and_say_which_keys():
    from dynconv.utils.errors import UserError

    pedconv, static = create_model("pedconv_resnet18"), create_model("resnet18")
    with pytest.raises(UserError, match=r"unexpected keys layer1\.0\.conv1\.attn\."):
        load_model_state(static, pedconv.state_dict(), "pedconv.pth")
    with pytest.raises(UserError, match=r"missing keys layer1\.0\.conv1\.attn\."):
        load_model_state(pedconv, static.state_dict(), "resnet18.pth")


def test_cli_trains_resumes_evaluates_and_plots(tmp_path, capsys):
    import main_cifar
    from conftest import run_entry
    from synthetic import make_image_folder

    root = make_image_folder(str(tmp_path / "data"), classes=2, per_class=6, size=32)
    run_dir = str(tmp_path / "run")
    common = ["--model", "pedconv_resnet8", "--data", root, "--workers", "0", "--batchsize", "4", "-s", run_dir]
    for epochs in ("1", "2"):
        code, out, err = run_entry(main_cifar.main, common + ["--epochs", epochs, "-r", run_dir], capsys)
        assert code == 0, err
    assert "training epochs 2-2" in out and "regulariser" not in err
    code, static_out, err = run_entry(main_cifar.main, ["-r", run_dir, "-e", "--data", root, "--workers", "0",
                                                        "--plot_ponder", "--plot_count", "2"], capsys)
    assert code == 0, err
    import os
    assert "figures of 6 layers' decisions" in static_out  # ResNet-8: 3 blocks of two PEDConvs
    assert os.path.getsize(os.path.join(run_dir, "ponder", "001.png")) > 5_000
    code, grouped_out, err = run_entry(main_cifar.main, ["-r", run_dir, "-e", "--data", root, "--workers", "0",
                                                         "--inference", "grouped"], capsys)
    assert code == 0, err
    # the same function either way: the same Prec@1; at 32x32 with 16-64 channels scaling every neighbourhood
    # (C_in * 9 per position) costs more MACs than assembling the small kernels (at 224x224 ResNet-18: fewer)
    prec = [[line for line in out.splitlines() if "Prec@1" in line] for out in (static_out, grouped_out)]
    assert prec[0] and prec[0] == prec[1]
    mmac = [float(out.split("per image:")[1].split()[0]) for out in (static_out, grouped_out)]
    assert mmac[0] > mmac[1] > 12.500992  # the static ResNet-8's count


def test_imagenet_recipe_trains_with_autoaugment(tmp_path, capsys):
    """pedconv_resnet18 with its recipe (AutoAugment's ImageNet policy, mixup, smoothing, cosine) on a tiny folder."""
    import main_imagenet
    from conftest import run_entry
    from synthetic import make_image_folder
    from dynconv.utils.checkpoint import load_checkpoint

    root = make_image_folder(str(tmp_path / "data"), splits=("train", "val"), classes=2, per_class=4, size=32)
    run_dir = str(tmp_path / "run")
    code, out, err = run_entry(main_imagenet.main, ["--model", "pedconv_resnet18", "--data", root, "--workers", "0",
                                                    "--resolution", "32", "--epochs", "1", "--warmup_epochs", "0",
                                                    "--batchsize", "4", "-s", run_dir], capsys)
    assert code == 0, err
    args = load_checkpoint(f"{run_dir}/checkpoint.pth")["args"]
    assert args["auto_augment"] == "imagenet" and args["momentum"] == 0.875 and args["weight_decay"] == 2 ** -15
    assert args["model_kwargs"] == {"rank": 1, "inference": "per_image"}
