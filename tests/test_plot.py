"""Ponder figures and the accuracy-vs-MMac plot: the cost map by hand, one PNG per image, what the figure says."""
import json
import os
import sys

import pytest
import torch


from dynconv.decisions import SpatialDecision, StaticDecision, UnitCost  # noqa: E402
from dynconv.models import model_config  # noqa: E402
from dynconv.utils.plot import (ACCURACY_TITLE, accuracy_vs_macs_figure, cost_ticks, family_styles,  # noqa: E402
                                plot_accuracy_vs_macs, ponder_cost_map, ponder_figure, row_family,
                                save_ponder_figures)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def spatial(hard):
    return SpatialDecision(hard=torch.tensor(hard, dtype=torch.float32), dilated=None, soft=None, cost=UnitCost(1, 1))


def example_decisions():
    """Two images; block 0 at 4x4, block 1 at 2x2 (image 0: only its top-left position), and a non-spatial
    decision in between that the plots must ignore."""
    b0 = [[[[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]], [[[1] * 4] * 4]]
    b1 = [[[[1, 0], [0, 0]]], [[[0, 0], [0, 0]]]]
    return [spatial(b0), StaticDecision(work=UnitCost(5, 5)), spatial(b1)]


def blocks(decisions):
    return [d for d in decisions if isinstance(d, SpatialDecision)]


def mask_titles(fig):
    return [ax.get_title() for sub in fig.subfigs for ax in sub.axes if ax.get_title().startswith("b")]


def test_ponder_cost_map_by_hand():
    decisions = example_decisions()
    # block 1's top-left position covers the 2x2 top-left quarter at 4x4 (nearest upsampling)
    expected0 = torch.tensor([[2, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(ponder_cost_map(decisions, 0), expected0)
    assert torch.equal(ponder_cost_map(decisions, 1), torch.ones(4, 4))


def test_cost_ticks_are_the_integers_up_to_the_block_count():
    assert cost_ticks(15) == list(range(16))
    deep = cost_ticks(33)  # ResNet-101: thinned, but still integers from 0 to the block count
    assert deep[0] == 0 and deep[-1] == 33 and len(deep) <= 17 and all(isinstance(t, int) for t in deep)


def test_figure_colour_bar_ticks_and_suptitle():
    decisions = example_decisions()
    num_blocks = len(blocks(decisions))
    fig = ponder_figure(torch.zeros(2, 3, 4, 4), decisions, 0, MEAN, STD)
    bars = [im.colorbar for sub in fig.subfigs for ax in sub.axes for im in ax.images if im.colorbar]
    assert len(bars) == 1
    assert list(bars[0].get_ticks()) == list(range(num_blocks + 1))
    # image 0: 2+2+2+1 + 1+1+1+1 = 11 executed block-positions over 16 positions = 0.6875
    assert fig.get_suptitle() == "ponder cost: 0.7 of 2 blocks per position on average"


def test_mask_titles_give_block_resolution_and_density():
    fig = ponder_figure(torch.zeros(2, 3, 4, 4), example_decisions(), 0, MEAN, STD)
    assert mask_titles(fig) == ["b0 4x4 44%", "b1 2x2 25%"]  # 7 of 16 and 1 of 4 positions
    fig = ponder_figure(torch.zeros(2, 3, 4, 4), example_decisions(), 1, MEAN, STD)
    assert mask_titles(fig) == ["b0 4x4 100%", "b1 2x2 0%"]
    assert "white = computed" in fig.subfigs[1].get_suptitle()


@pytest.mark.parametrize("labels, predictions, class_names, caption", [
    (None, None, None, ""),
    ([2, 0], None, None, "true: 2"),
    (None, torch.tensor([1, 0]), None, "predicted: 1"),
    (torch.tensor([2, 0]), torch.tensor([1, 0]), ["cat", "dog", "ship"], "true: ship\npredicted: dog"),
])
def test_input_title_names_the_classes(labels, predictions, class_names, caption):
    label = None if labels is None else labels[0]
    prediction = None if predictions is None else predictions[0]
    fig = ponder_figure(torch.zeros(2, 3, 4, 4), example_decisions(), 0, MEAN, STD, label, prediction, class_names)
    assert fig.subfigs[0].axes[0].get_title() == caption


def test_save_writes_one_png_per_image(tmp_path):
    # image 1 has an all-white (block 0) and an all-black (block 1) mask
    images = torch.randn(2, 3, 4, 4)
    paths = save_ponder_figures(images, example_decisions(), str(tmp_path / "p"), MEAN, STD,
                                labels=[2, 0], predictions=[1, 0], class_names=["cat", "dog", "ship"])
    assert paths == [str(tmp_path / "p" / "000.png"), str(tmp_path / "p" / "001.png")]
    assert sorted(os.listdir(tmp_path / "p")) == ["000.png", "001.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000


def test_save_without_labels(tmp_path):
    paths = save_ponder_figures(torch.randn(2, 3, 4, 4), example_decisions(), str(tmp_path), MEAN, STD)
    assert [os.path.basename(p) for p in paths] == ["000.png", "001.png"]


def test_no_spatial_decisions_is_an_error():
    with pytest.raises(ValueError, match="SpatialDecision"):
        ponder_figure(torch.zeros(1, 3, 4, 4), [], 0, MEAN, STD)


def test_accuracy_plot_has_a_title(tmp_path):
    rows = [dict(model="resnet32", budget=-1, mmac=69.1, prec1=93.0),
            dict(model="resnet32", budget=0.5, mmac=40.0, prec1=92.5)]
    assert accuracy_vs_macs_figure(rows).axes[0].get_title() == ACCURACY_TITLE
    assert accuracy_vs_macs_figure(rows, "mine").axes[0].get_title() == "mine"
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_accuracy_vs_macs(str(results), str(tmp_path / "acc.png"))
    assert os.path.getsize(tmp_path / "acc.png") > 10_000


def test_a_multi_target_model_is_one_curve_beside_the_single_budget_points():
    single = [dict(model="resnet32", budget=b, mmac=m, prec1=p) for b, m, p in [(0.25, 20.0, 70.0), (0.75, 50.0, 80.0)]]
    multi = [dict(model="resnet32", budget=b, mmac=m, prec1=p, targets=[0.25, 0.5, 0.75])
             for b, m, p in [(0.75, 52.0, 79.0), (0.25, 21.0, 71.0), (0.5, 36.0, 76.0)]]
    ax = accuracy_vs_macs_figure([dict(model="resnet32", budget=-1, mmac=69.1, prec1=82.0)] + single + multi).axes[0]
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert curves == {"ResNet (dense)": [69.1], "DynConv resnet32": [20.0, 50.0],
                      "DynConv resnet32, one multi-target network": [21.0, 36.0, 52.0]}


def test_a_variant_of_a_model_is_a_curve_of_its_own():
    """Tiled ResNet-32s are another network than the per-position ones: never joined into one curve."""
    rows = [dict(model="resnet32", budget=b, mmac=m, prec1=p) for b, m, p in [(0.25, 21.6, 84.9), (0.5, 38.8, 84.9)]]
    rows += [dict(model="resnet32", budget=b, mmac=m, prec1=p, variant="tiles=(32, 16, 8)")
             for b, m, p in [(0.5, 37.0, 85.3), (0.25, 21.4, 84.0)]]
    ax = accuracy_vs_macs_figure(rows).axes[0]
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert curves == {"DynConv resnet32": [21.6, 38.8], "DynConv resnet32 (tiles=(32, 16, 8))": [21.4, 37.0]}


def test_another_methods_models_are_their_own_curve_not_dense_points():
    rows = [dict(model="resnet32", budget=-1, mmac=69.1, prec1=82.0, arch="ResNet"),
            dict(model="resnet20", budget=-1, mmac=40.8, prec1=80.9, arch="ResNet"),
            dict(model="pedconv_resnet32", budget=-1, mmac=70.2, prec1=83.0, arch="ResNet", method="PEDConv"),
            dict(model="pedconv_resnet20", budget=-1, mmac=41.5, prec1=81.0, arch="ResNet", method="PEDConv")]
    ax = accuracy_vs_macs_figure(rows).axes[0]
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert curves == {"ResNet (dense)": [40.8, 69.1], "PEDConv ResNet": [41.5, 70.2]}
    assert {t.get_text() for t in ax.texts} == {"resnet32", "resnet20", "pedconv_resnet32", "pedconv_resnet20"}


def test_runs_of_two_schedules_are_two_curves_the_shorter_faded():
    rows = [dict(model=m, budget=-1, mmac=x, prec1=p, arch="ResNet", epochs=e)
            for m, x, p, e in [("resnet8", 12.5, 75.7, 10), ("resnet20", 40.8, 80.9, 10), ("resnet8", 12.5, 80.1, 30),
                               ("resnet14", 26.7, 84.0, 30)]]
    rows.append(dict(model="resnet8", budget=0.5, mmac=7.2, prec1=76.0, arch="ResNet", epochs=30))
    ax = accuracy_vs_macs_figure(rows).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {label: list(line.get_ydata()) for label, line in lines.items()} == {
        "ResNet (dense), 10 epochs": [75.7, 80.9], "ResNet (dense), 30 epochs": [80.1, 84.0],
        "DynConv resnet8, 30 epochs": [76.0]}
    assert lines["ResNet (dense), 10 epochs"].get_alpha() < lines["ResNet (dense), 30 epochs"].get_alpha() == 1.0
    one_schedule = accuracy_vs_macs_figure(rows[2:]).axes[0]  # one schedule: no epochs in the labels
    assert {line.get_label() for line in one_schedule.get_lines()} == {"ResNet (dense)", "DynConv resnet8"}


def test_a_models_config_gives_its_family_and_marker_dense_or_dynamic():
    """ConvNeXt's dense and DynConv runs are one family, drawn with its config's marker (plot_style); a model no
    longer registered falls back to its method's name and a spare colour."""
    rows = [dict(model="convnext_atto", budget=-1, mmac=45.0, prec1=46.9, arch="ConvNeXt 64x64"),
            dict(model="convnext_atto", budget=0.25, mmac=14.0, prec1=45.5, arch="ConvNeXt 64x64"),
            dict(model="dydensenet86", budget=-1, mmac=65.2, prec1=50.5, arch="DyDenseNet", method="DGC"),
            dict(model="retired_net", budget=-1, mmac=30.0, prec1=60.0, method="Retired"),
            dict(model="resnet32", budget=-1, mmac=69.1, prec1=82.0)]
    assert [row_family(r) for r in rows] == ["ConvNeXt", "ConvNeXt", "DGC", "Retired", "dense"]
    styles = family_styles(rows)
    assert styles["ConvNeXt"] == model_config("convnext_atto").plot_style[1:] == ("P", "tab:purple")
    assert styles["DGC"] == ("v", "tab:green") and styles["dense"] == ("o", "black")
    assert styles["Retired"] == ("X", "tab:brown")  # the first spare colour
    ax = accuracy_vs_macs_figure(rows).axes[0]
    assert {line.get_label(): line.get_marker() for line in ax.get_lines()} == {
        "ConvNeXt 64x64 (dense)": "P", "DynConv convnext_atto": "P", "DGC DyDenseNet": "v", "ResNet (dense)": "o",
        "Retired ResNet": "X"}
