"""The run's settings: reconciled once from the command line, the checkpoint and the recipe, frozen, each value
with its source."""
import pytest

import main_cifar
from dynconv.apps import cifar, imagenet
from dynconv.models import Decides, model_config
from dynconv.utils.cli import parse
from dynconv.utils.errors import UserError
from dynconv.utils.settings import CHECKPOINT, COMMAND_LINE, DERIVED, RECIPE, decides, reconcile


def settings_of(app, argv, checkpoint=None):
    args, explicit = parse(app.make_parser(), argv)
    return reconcile(args, explicit, checkpoint, app.DEFAULTS["model"])


def test_a_short_run_scales_the_recipes_warm_up():
    recipe = model_config("convnext_atto").recipe
    settings = settings_of(imagenet, ["--model", "convnext_atto", "--epochs", "3"])
    assert settings.warmup_epochs == pytest.approx(recipe["warmup_epochs"] * 3 / recipe["epochs"])
    assert settings.source("warmup_epochs") == DERIVED
    settings = settings_of(imagenet, ["--model", "convnext_atto", "--epochs", "3", "--warmup_epochs", "1"])
    assert settings.warmup_epochs == 1 and settings.source("warmup_epochs") == COMMAND_LINE  # given: kept


def test_each_value_says_where_it_came_from_and_none_can_be_changed():
    saved = {"args": {"model": "resnet8", "budget": 0.5, "budget_targets": None, "model_kwargs": {}, "lr": 0.05,
                      "epochs": 7}}
    evaluation = settings_of(cifar, ["-r", "x.pth", "-e", "--batchsize", "32"], saved)
    assert (evaluation.model, evaluation.budget) == ("resnet8", 0.5)
    assert evaluation.source("model") == CHECKPOINT and evaluation.source("batchsize") == COMMAND_LINE
    # evaluating takes the architecture, not the recipe: the lr is the model's recipe's
    assert evaluation.lr == model_config("resnet8").recipe["lr"] and evaluation.source("lr") == RECIPE
    resumed = settings_of(cifar, ["-r", "x.pth"], saved)
    assert (resumed.lr, resumed.epochs) == (0.05, 7) and resumed.source("epochs") == CHECKPOINT
    with pytest.raises(AttributeError, match="frozen"):
        resumed.lr = 0.1
    assert dict(resumed)["lr"] == 0.05 and resumed.replace(lr=0.1).lr == 0.1 and resumed.lr == 0.05


@pytest.mark.parametrize("argv, kind, gated", [
    (["--model", "resnet8"], Decides.NOTHING, False),  # --budget -1 by default: the static network
    (["--model", "resnet8", "--budget", "0"], Decides.SPATIAL, True),  # budget 0 is a budget
    (["--model", "resnet8", "--budget_targets", "0.25", "0.5"], Decides.SPATIAL, True),
    (["--model", "dydensenet86"], Decides.OWN, True),
    (["--model", "pedconv_resnet32"], Decides.WEIGHTS, False),
])
def test_what_a_run_decides_is_one_kind(argv, kind, gated):
    settings = settings_of(cifar, argv)
    assert decides(settings) is kind and kind.gated is gated


def test_tied_norms_default_to_the_pretrained_start_and_can_be_chosen():
    multi = ["--model", "resnet8", "--budget_targets", "0.25", "0.5"]
    assert settings_of(cifar, multi).tied_norms is False  # from scratch: one affine per budget
    pretrained = settings_of(cifar, multi + ["--pretrained", "dense.pth"])
    assert pretrained.tied_norms is True and pretrained.source("tied_norms") == DERIVED
    untied = settings_of(cifar, multi + ["--pretrained", "dense.pth", "--no-tied_norms"])
    assert untied.tied_norms is False and untied.source("tied_norms") == COMMAND_LINE
    saved = {"args": {"model": "resnet8", "budget": -1, "budget_targets": [0.25, 0.5], "model_kwargs": {},
                      "tied_norms": True}}
    assert settings_of(cifar, ["-r", "x.pth"], saved).tied_norms is True  # resumed as trained
    with pytest.raises(UserError, match="--no-tied_norms contradicts the checkpoint"):
        settings_of(cifar, ["-r", "x.pth", "--no-tied_norms"], saved)


def test_tied_norms_without_budgets_is_refused_before_any_data(tmp_path):
    with pytest.raises(UserError, match="^--tied_norms ties the per-budget norms of a multi-target model: add "
                                        "--budget_targets$"):
        main_cifar.main(["--model", "resnet8", "--tied_norms", "--data", str(tmp_path / "none"), "-s",
                         str(tmp_path / "r")])
