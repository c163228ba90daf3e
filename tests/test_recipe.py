"""dynconv.utils.recipe against hand-computed values: optimizers, schedules, lr scales and freezing, EMA, mixup, checks."""
import math

import pytest
import torch

from dynconv.utils import recipe


class Net(torch.nn.Module):
    """A conv "backbone" with a norm layer and a linear "head"."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)


def by_prefix(name):
    return "head" if name.startswith("head.") else "backbone"


def one_param_optimizer(lr, lr_scale=None):
    group = {"params": [torch.nn.Parameter(torch.zeros(2))], "name": "backbone"}
    if lr_scale is not None:
        group["lr_scale"] = lr_scale
    return recipe.create_optimizer([group], "sgd", lr=lr, weight_decay=0.0)


def lr_at(optimizer, scheduler, update, updates_per_epoch, freeze_epochs=None):
    recipe.set_lr(scheduler, update // updates_per_epoch, update % updates_per_epoch, updates_per_epoch,
                  freeze_epochs)
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize("opt, cls, nesterov", [("sgd", torch.optim.SGD, False), ("nesterov", torch.optim.SGD, True),
                                                ("adamw", torch.optim.AdamW, None)])
def test_optimizer_kind_weight_decay_and_momentum(opt, cls, nesterov):
    groups = recipe.param_groups(Net(), 5e-4)
    optimizer = recipe.create_optimizer(groups, opt, lr=0.1, weight_decay=5e-4, momentum=0.8)
    assert type(optimizer) is cls
    (group,) = optimizer.param_groups
    assert group["lr"] == 0.1 and group["weight_decay"] == 5e-4
    if nesterov is not None:
        assert group["nesterov"] is nesterov and group["momentum"] == 0.8


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError, match="sgd, nesterov, adamw"):
        recipe.create_optimizer(recipe.param_groups(Net(), 0.0), "adam", lr=0.1, weight_decay=0.0)


def test_param_groups_every_parameter_once_and_no_weight_decay_split():
    model = Net()
    model.head.bias.requires_grad_(False)
    groups = recipe.param_groups(model, 1e-4, lr_scales={"head": 0.5, "masks": 2.0}, group_of=by_prefix,
                                 no_weight_decay_norm_bias=True)
    summary = {(g["name"], g["weight_decay"], g["lr_scale"]): {id(p) for p in g["params"]} for g in groups}
    assert summary == {
        ("backbone", 1e-4, 1.0): {id(model.conv.weight)},
        ("backbone", 0.0, 1.0): {id(model.conv.bias), id(model.norm.weight), id(model.norm.bias)},
        ("head", 1e-4, 0.5): {id(model.head.weight)},
    }
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == 5  # head.bias (frozen) left out
    (plain,) = recipe.param_groups(model, 1e-4)
    assert plain["name"] == "backbone" and plain["weight_decay"] == 1e-4 and len(plain["params"]) == 5


def test_step_schedule_decays_at_the_first_update_of_the_milestone_epoch():
    expected = {0: 0.1, 4: 0.1, 5: 0.1, 9: 0.1, 10: 0.01, 14: 0.01, 24: 0.01}
    optimizer = one_param_optimizer(0.1)
    scheduler = recipe.create_scheduler(optimizer, "step", epochs=5, updates_per_epoch=5, lr_decay=(2,))
    for update, lr in expected.items():
        assert lr_at(optimizer, scheduler, update, 5) == [pytest.approx(lr, rel=1e-12)], update
    for update in (9, 10, 12):  # resuming: a fresh optimizer and scheduler, no state carried over
        optimizer = one_param_optimizer(0.1)
        scheduler = recipe.create_scheduler(optimizer, "step", epochs=5, updates_per_epoch=5, lr_decay=(2,))
        assert lr_at(optimizer, scheduler, update, 5) == [pytest.approx(expected.get(update, 0.01), rel=1e-12)]


def test_step_schedule_two_milestones_and_rate():
    optimizer = one_param_optimizer(0.1)
    scheduler = recipe.create_scheduler(optimizer, "step", epochs=6, updates_per_epoch=3, lr_decay=(4, 1),
                                        decay_rate=0.5)
    lrs = [lr_at(optimizer, scheduler, u, 3)[0] for u in range(18)]
    assert lrs == pytest.approx([0.1] * 3 + [0.05] * 9 + [0.025] * 6, rel=1e-12)


def test_cosine_with_warmup_by_hand():
    # timm's formula with warmup_prefix=True over epochs - warmup_epochs (what create_scheduler asks for):
    # t < W: warmup_lr + t (lr - warmup_lr) / W; then min_lr + (lr - min_lr)(1 + cos(pi (t - W) / T)) / 2,
    # T = (epochs - warmup_epochs) * updates_per_epoch; min_lr from t = W + T on.
    lr, warmup_lr, min_lr, ups = 0.4, 0.01, 0.001, 4
    W, T = 2 * ups, 8 * ups  # 2 warm-up epochs of 10
    optimizer = one_param_optimizer(lr)
    scheduler = recipe.create_scheduler(optimizer, "cosine", epochs=10, updates_per_epoch=ups, warmup_epochs=2,
                                        warmup_lr=warmup_lr, min_lr=min_lr)
    expected = {
        0: 0.01,
        4: 0.01 + 4 * (0.4 - 0.01) / 8,                            # mid warm-up: 0.205
        W: 0.4,                                                    # end of warm-up: cos(0) = 1
        W + T // 2: 0.001 + 0.5 * 0.399,                           # mid cosine: cos(pi / 2) = 0
        W + T - 1: 0.001 + 0.5 * 0.399 * (1 + math.cos(math.pi * 31 / 32)),  # last update
        W + T: 0.001,                                              # after the schedule
    }
    for update, value in expected.items():
        assert lr_at(optimizer, scheduler, update, ups) == [pytest.approx(value, rel=1e-12)], update


def test_group_lr_scale_and_freezing():
    model = Net()
    groups = recipe.param_groups(model, 0.0, lr_scales={"head": 0.2}, group_of=by_prefix,
                                 no_weight_decay_norm_bias=True)
    optimizer = recipe.create_optimizer(groups, "sgd", lr=0.1, weight_decay=0.0)
    scheduler = recipe.create_scheduler(optimizer, "step", epochs=6, updates_per_epoch=2, lr_decay=(4,))
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["backbone", "backbone", "head", "head"]

    def lrs(update, freeze=None):
        return dict(zip(names, lr_at(optimizer, scheduler, update, 2, freeze)))

    assert lrs(0) == pytest.approx({"backbone": 0.1, "head": 0.02})
    freeze = {"backbone": 2}
    assert lrs(0, freeze) == pytest.approx({"backbone": 0.0, "head": 0.02})
    assert [g["lr"] for g in optimizer.param_groups][:2] == [0.0, 0.0]
    assert lrs(3, freeze) == pytest.approx({"backbone": 0.0, "head": 0.02})  # epoch 1: still frozen
    assert lrs(4, freeze) == pytest.approx({"backbone": 0.1, "head": 0.02})  # epoch 2: thawed
    assert lrs(8, freeze) == pytest.approx({"backbone": 0.01, "head": 0.002})
    assert lrs(0, {"head": 1}) == pytest.approx({"backbone": 0.1, "head": 0.0})
    assert recipe.apply_freeze(optimizer, 0, {"backbone": 1, "head": 1}) == ["backbone", "head"]


def test_frozen_group_does_not_move_and_resume_mid_freeze_restores_scale():
    model = Net()
    groups = recipe.param_groups(model, 1e-2, lr_scales={"head": 0.5}, group_of=by_prefix)
    optimizer = recipe.create_optimizer(groups, "sgd", lr=0.1, weight_decay=1e-2)
    scheduler = recipe.create_scheduler(optimizer, "step", epochs=3, updates_per_epoch=1)
    recipe.set_lr(scheduler, 0, 0, 1, {"head": 1})
    before = model.head.weight.detach().clone()
    model.head(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert torch.equal(model.head.weight, before)  # lr 0: weight decay and momentum do nothing either

    saved = optimizer.state_dict()  # saved mid-freeze: lr_scale is 0 in it
    optimizer = recipe.create_optimizer(recipe.param_groups(model, 1e-2, {"head": 0.5}, by_prefix), "sgd",
                                        lr=0.1, weight_decay=1e-2)
    scheduler = recipe.create_scheduler(optimizer, "step", epochs=3, updates_per_epoch=1)
    optimizer.load_state_dict(saved)
    recipe.set_lr(scheduler, 1, 0, 1, {"head": 1})
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx({"backbone": 0.1, "head": 0.05})


def test_count_updates():
    assert [recipe.count_updates(n, k) for n, k in ((10, 1), (10, 2), (10, 3), (1, 4))] == [10, 5, 4, 1]


def test_ema_one_update_by_hand_and_state_round_trip():
    model = torch.nn.Linear(3, 2)
    assert recipe.create_ema(model, None) is None and recipe.create_ema(model, 0.0) is None
    recipe.update_ema(None, model)  # no EMA: nothing to do
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = recipe.create_ema(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    w1 = model.state_dict()
    recipe.update_ema(ema, model)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * w0[k] + 0.1 * w1[k])
    checkpoint = {recipe.EMA_KEY: recipe.ema_state(ema)}
    fresh = recipe.create_ema(torch.nn.Linear(3, 2), 0.9)
    assert recipe.restore_ema(fresh, checkpoint)
    for k, v in fresh.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * w0[k] + 0.1 * w1[k])
    assert not recipe.restore_ema(fresh, {}) and not recipe.restore_ema(None, checkpoint)
    assert recipe.ema_state(None) is None
    with pytest.raises(ValueError, match="EMA weights do not fit"):
        recipe.restore_ema(recipe.create_ema(torch.nn.Linear(3, 5), 0.9), checkpoint)


def test_mixup_soft_targets_and_losses():
    assert recipe.create_mixup(0.0, 0.0, 0.1, 10) is None
    torch.manual_seed(0)
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for alphas in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixup = recipe.create_mixup(*alphas, 0.1, 5)
        _, target = mixup(images.clone(), labels)
        assert target.shape == (4, 5) and torch.allclose(target.sum(1), torch.ones(4))
        assert target.min() >= 0.1 / 5 - 1e-6  # smoothing applied by mixup: every class at least eps / C


def test_clip_gradients():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    recipe.clip_gradients([p], None)
    recipe.clip_gradients([p], 0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))
    recipe.clip_gradients([p], 1.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    p.grad = torch.tensor([3.0, -4.0])
    recipe.clip_gradients([p], 2.0, mode="value")
    assert torch.equal(p.grad, torch.tensor([2.0, -2.0]))


GOOD = dict(opt="sgd", sched="cosine", epochs=10, warmup_epochs=1, min_lr=0.0, lr=0.1, ema_decay=0.999,
            smoothing=0.1, mixup=0.8, cutmix=1.0, update_freq=1, clip_grad=1.0, batch_size=64)


@pytest.mark.parametrize("change, message", [
    ({"opt": "adam"}, "--opt must be one of sgd, nesterov, adamw"),
    ({"sched": "poly"}, "--sched must be one of step, cosine"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"warmup_epochs": -1}, "--warmup_epochs must not be negative"),
    ({"warmup_epochs": 10}, r"--warmup_epochs \(10\) must be less than --epochs \(10\)"),
    ({"lr": -0.1}, "--lr must not be negative"),
    ({"warmup_lr": -1e-3}, "--warmup_lr must not be negative"),
    ({"min_lr": -1e-5}, "--min_lr must not be negative"),
    ({"min_lr": 0.2}, r"--min_lr \(0.2\) must not exceed --lr \(0.1\)"),
    ({"lr_decay": (5, -1)}, "--lr_decay epochs must not be negative"),
    ({"ema_decay": -0.1}, r"--ema_decay must be in \[0, 1\)"),
    ({"ema_decay": 1.0}, r"--ema_decay must be in \[0, 1\)"),
    ({"smoothing": -0.1}, r"--smoothing must be in \[0, 1\)"),
    ({"smoothing": 1.0}, r"--smoothing must be in \[0, 1\)"),
    ({"mixup": -0.2}, "--mixup alpha must not be negative"),
    ({"cutmix": -1.0}, "--cutmix alpha must not be negative"),
    ({"batch_size": 63}, "--mixup/--cutmix need an even --batchsize"),
    ({"update_freq": 0}, "--update_freq must be at least 1"),
    ({"clip_grad": -1.0}, "--clip_grad must not be negative"),
    ({"clip_mode": "max"}, "--clip_mode must be one of norm, value, agc"),
])
def test_check_recipe_args_rejects(change, message):
    recipe.check_recipe_args(**GOOD)
    with pytest.raises(ValueError, match=message):
        recipe.check_recipe_args(**{**GOOD, **change})


def test_check_recipe_args_accepts_edges():
    recipe.check_recipe_args(**{**GOOD, "warmup_epochs": 0, "ema_decay": None, "smoothing": 0.0, "mixup": 0.0,
                                "cutmix": 0.0, "batch_size": 63, "clip_grad": None, "lr": None})
    recipe.check_recipe_args("nesterov", "step", 1)
    recipe.check_recipe_args("adamw", "cosine", 2, warmup_epochs=1, ema_decay=0.0)
