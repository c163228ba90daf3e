import pytest
import torch

from conftest import set_mask_logits
from dynconv import MaskUnit, count_mmac, count_parameters
from dynconv.models import Decides, create_model, list_models, model_config

DENSE_MMAC = {"resnet8": 12.500992, "resnet14": 26.656768, "resnet20": 40.812544, "resnet26": 54.968320,
              "resnet32": 69.124096}
ALL_ON = {"resnet8": 12.705088, "resnet32": 70.365760}
ALL_OFF = {"resnet8": 0.908608, "resnet32": 1.946176}


def test_registry_lists_cifar_models():
    spatial = [name for name in list_models("cifar") if model_config(name).gates is Decides.SPATIAL]
    assert spatial == sorted(DENSE_MMAC)
    assert {"dydensenet86", "pedconv_resnet8", "pedconv_resnet20", "pedconv_resnet32"} <= set(list_models("cifar"))
    with pytest.raises(KeyError, match="choices"):
        create_model("resnet9", "cifar")


@pytest.mark.parametrize("name", sorted(DENSE_MMAC))
def test_dense_mmac(name):
    model = create_model(name).eval()
    assert count_mmac(model, torch.randn(2, 3, 32, 32)) == pytest.approx(DENSE_MMAC[name], abs=5e-7)


@pytest.mark.parametrize("name", sorted(ALL_ON))
def test_sparse_mmac_all_on_and_all_off(name):
    model = create_model(name, gate_layer=MaskUnit).eval()
    set_mask_logits(model, 10.0)
    assert count_mmac(model, torch.randn(2, 3, 32, 32)) == pytest.approx(ALL_ON[name], abs=5e-7)
    set_mask_logits(model, -10.0)
    assert count_mmac(model, torch.randn(2, 3, 32, 32)) == pytest.approx(ALL_OFF[name], abs=5e-7)


def test_parameter_counts():
    assert count_parameters(create_model("resnet32")) == 466906
    assert count_parameters(create_model("resnet32", gate_layer=MaskUnit)) == 472056


def test_dense_count_matches_ptflops():
    """ptflops' module-level count (functional ops off; BN, ReLU, linear and pooling ignored) = our conv count."""
    ptflops = pytest.importorskip("ptflops")
    for name in ("resnet8", "resnet20"):
        macs, params = ptflops.get_model_complexity_info(
            create_model(name).eval(), (3, 32, 32), as_strings=False, print_per_layer_stat=False,
            backend="pytorch", backend_specific_config={"count_functional": False},
            ignore_modules=[torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Linear, torch.nn.AdaptiveAvgPool2d])
        assert macs / 1e6 == pytest.approx(DENSE_MMAC[name], abs=1e-6)
        assert params == count_parameters(create_model(name))


def test_full_count_adds_bn_relu_linear_pool_by_hand():
    model = create_model("resnet8").eval()
    full = count_mmac(model, torch.randn(1, 3, 32, 32), full=True)
    # BN: 2 per element; ReLU: 1 per element (stem + 2 per block); pool: input elements; fc: 64*10 + 10
    bn = 2 * (16 * 1024 + 2 * 16 * 1024 + 2 * 32 * 256 + 32 * 256 + 2 * 64 * 64 + 64 * 64)
    relu = 16 * 1024 + 2 * 16 * 1024 + 2 * 32 * 256 + 2 * 64 * 64
    extra = bn + relu + 64 * 64 + 64 * 10 + 10
    assert full == pytest.approx(DENSE_MMAC["resnet8"] + extra / 1e6, abs=1e-9)


def test_all_on_masks_equal_dense_computation():
    torch.manual_seed(0)
    dense = create_model("resnet14").eval()
    sparse = create_model("resnet14", gate_layer=MaskUnit).eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    set_mask_logits(sparse, 10.0)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(sparse(x)[0], dense(x)[0])
    set_mask_logits(sparse, -10.0)  # all off: every block is its (downsampled) identity
    assert not torch.allclose(sparse(x)[0], dense(x)[0])


@pytest.mark.parametrize("name", list_models("cifar"))
def test_every_parameter_gets_a_gradient(name):
    from dynconv import SparsityCriterion

    spatial = model_config(name).gates is Decides.SPATIAL
    model = create_model(name, gate_layer=MaskUnit if spatial else None).train()
    logits, decisions = model(torch.randn(2, 3, 32, 32))
    loss = logits.logsumexp(1).mean()
    if spatial:
        loss = loss + SparsityCriterion(0.5, 10)(decisions, 1)[0]
    else:  # the models' own regularisers (DGC's lasso, PEDConv's decoder) reach their generators
        loss = loss + sum(d.loss for d in decisions if d.loss is not None)
    loss.backward()
    assert not torch.isnan(logits).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_reference_state_dict_keys():
    keys = set(create_model("resnet8", gate_layer=MaskUnit).state_dict())
    expected = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight",
                "layer1.0.bn2.running_var", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
                "layer3.0.masker.maskconv.conv.weight", "layer3.0.masker.maskconv.conv.bias",
                "layer3.0.masker.maskconv.fc.weight", "layer3.0.masker.maskconv.fc.bias", "fc.weight", "fc.bias"}
    assert expected <= keys
    assert all(k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2", "layer3", "fc"} for k in keys)
