"""The run's settings: reconciled once from the command line, the checkpoint and the recipe, frozen, each value
with its source."""
import pytest

from dynconv.apps import cifar, imagenet
from dynconv.models import Decides, model_config
from dynconv.utils.cli import parse
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
