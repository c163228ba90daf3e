"""Training-recipe pieces built from timm: optimizer, per-iteration lr schedule, group freezing, EMA,
mixup/cutmix targets (their loss is dynconv.objectives.TaskLoss), gradient clipping, and the validation of the
recipe's arguments.

How the training loop uses them (one optimizer update = one iteration; with --update_freq k an
update happens every k batches):

    groups = param_groups(model, wd, lr_scales, group_of, no_weight_decay_norm_bias)
    optimizer = create_optimizer(groups, opt, lr, wd, momentum)
    ups = count_updates(len(train_loader), update_freq)
    scheduler = create_scheduler(optimizer, sched, epochs, ups, lr_decay, warmup_epochs=..., ...)
    ema = create_ema(model, ema_decay)            # after the model's weights are loaded
    mixup = create_mixup(mixup_alpha, cutmix_alpha, smoothing, num_classes)
    for each update i of epoch e (i counts updates, not batches):
        set_lr(scheduler, e, i, ups, freeze_epochs)   # before the update: its lr is the schedule's at e*ups+i
        images, target = mixup(images, target) if mixup else (images, target)
        loss = TaskLoss term (dynconv.objectives); backward; scaler.unscale_(optimizer)
        clip_gradients(params, clip_grad, clip_mode); optimizer step
        update_ema(ema, model)
    checkpoint[EMA_KEY] = ema_state(ema); ... restore_ema(ema, checkpoint)

Every lr is a function of the absolute update index alone, so a resumed run needs no scheduler state.
"""
# timm is imported in the functions that use it: importing it (and torchvision with it) takes seconds, and the
# command line's flags are checked before that (a bad flag fails at once)

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("step", "cosine")
CLIP_MODES = ("norm", "value", "agc")
EMA_KEY = "state_dict_ema"  # the key timm's own checkpoints use for the EMA weights

# timm's "sgd" is Nesterov SGD; ours is the DynConv reference's classical momentum SGD, timm's "momentum"
_TIMM_OPTIMIZER = {"sgd": "momentum", "nesterov": "sgd", "adamw": "adamw"}
# param-group key remembering the configured lr_scale while freezing overwrites "lr_scale"
_CONFIGURED_SCALE = "configured_lr_scale"


def param_groups(model, weight_decay, lr_scales=None, group_of=None, no_weight_decay_norm_bias=False):
    """Optimizer parameter groups of `model`'s trainable parameters, each parameter exactly once.

    `group_of(param_name)` names a parameter's group (default: every parameter in "backbone"). A group
    is a dict with "params", "name", "lr_scale" (`lr_scales[name]`, default 1.0; timm's schedulers
    multiply the scheduled lr by it) and "weight_decay". With `no_weight_decay_norm_bias`, the 1-D
    parameters (biases, norm weights) of each name go in a second group with the same name and
    lr_scale and weight_decay 0. Parameters with requires_grad False are left out; names in
    `lr_scales` that own no parameter are ignored (e.g. mask units of a dense model). Groups come in
    the order their first parameter appears in the model."""
    lr_scales = lr_scales or {}
    groups = {}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = group_of(param_name) if group_of is not None else "backbone"
        decays = not (no_weight_decay_norm_bias and param.ndim <= 1)
        group = groups.setdefault((name, decays), {
            "params": [], "name": name, "lr_scale": float(lr_scales.get(name, 1.0)),
            "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return list(groups.values())


def create_optimizer(param_groups, opt, lr, weight_decay, momentum=0.9):
    """The optimizer `opt` over `param_groups` (from param_groups()), through timm's create_optimizer_v2.

    "sgd": SGD with classical momentum (the DynConv reference), "nesterov": SGD with Nesterov momentum,
    "adamw": AdamW (momentum unused). Groups keep their own weight_decay; `weight_decay` is the default
    for groups without one. filter_bias_and_bn is off: the no-weight-decay split is param_groups'."""
    if opt not in _TIMM_OPTIMIZER:
        raise ValueError(f"unknown optimizer '{opt}'; choose one of: {', '.join(OPTIMIZERS)}")
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(param_groups, opt=_TIMM_OPTIMIZER[opt], lr=lr, weight_decay=weight_decay,
                               momentum=momentum, filter_bias_and_bn=False)


def count_updates(num_batches, update_freq=1):
    """Optimizer updates in an epoch of `num_batches` batches with an update every `update_freq`
    batches (the last, shorter accumulation still updates, as in timm's train.py)."""
    return -(-num_batches // update_freq)


def create_scheduler(optimizer, sched, epochs, updates_per_epoch, lr_decay=(), decay_rate=0.1,
                     warmup_epochs=0, warmup_lr=0.0, min_lr=0.0):
    """A timm scheduler (create_scheduler_v2, stepped per update) spanning `epochs` epochs in all.

    Drive it with set_lr(). Both schedules warm up linearly from warmup_lr over warmup_epochs *
    updates_per_epoch updates: lr(t) = warmup_lr + t (lr - warmup_lr) / W for t < W.
    "step": then lr * decay_rate^k, k the number of `lr_decay` epochs (absolute, warm-up included)
    reached; the decay takes effect at the first update of that epoch.
    "cosine": then min_lr + (lr - min_lr)(1 + cos(pi (t - W) / T)) / 2 with T = (epochs -
    warmup_epochs) * updates_per_epoch, and min_lr from t = W + T on (timm's warmup_prefix=True
    over epochs - warmup_epochs, so the whole schedule still fits in `epochs`).
    Each group's lr is the schedule's value times its "lr_scale" (timm's Scheduler.update_groups)."""
    from timm.scheduler import create_scheduler_v2

    common = dict(warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, step_on_epochs=False,
                  updates_per_epoch=updates_per_epoch)
    if sched == "step":
        # timm's multistep applies milestone M (in updates) one update early, at t = M - 1; half an
        # update later puts the decay exactly on the epoch's first update, robust to rounding
        milestones = sorted(m + 0.5 / updates_per_epoch for m in lr_decay)
        scheduler, _ = create_scheduler_v2(optimizer, "multistep", num_epochs=epochs, decay_milestones=milestones,
                                           decay_rate=decay_rate, **common)
    elif sched == "cosine":
        scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=epochs - warmup_epochs, min_lr=min_lr,
                                           warmup_prefix=True, **common)
    else:
        raise ValueError(f"unknown schedule '{sched}'; choose one of: {', '.join(SCHEDULES)}")
    return scheduler


def apply_freeze(optimizer, epoch, freeze_epochs):
    """Freezes the groups named in `freeze_epochs` (group name -> epochs) during their first epochs.

    A frozen group's "lr_scale" is 0 (so the lr the scheduler sets is 0) until `epoch` reaches its
    count, then the configured scale again; the configured scale is kept in the group, so a checkpoint
    saved mid-freeze resumes correctly. The budget-aware ConvNeXt recipe freezes the pretrained
    backbone this way, {"backbone": 5}: lr 0 for the first 5 epochs, mask units at the full rate.
    Momentum/Adam statistics keep accumulating while frozen. Takes effect at the next set_lr(), which
    calls it. Returns the names of the groups frozen now."""
    freeze_epochs = freeze_epochs or {}
    frozen = set()
    for group in optimizer.param_groups:
        configured = group.setdefault(_CONFIGURED_SCALE, group.get("lr_scale", 1.0))
        if epoch < freeze_epochs.get(group.get("name"), 0):
            group["lr_scale"] = 0.0
            frozen.add(group["name"])
        else:
            group["lr_scale"] = configured
    return sorted(frozen)


def set_lr(scheduler, epoch, step_in_epoch, updates_per_epoch, freeze_epochs=None):
    """Sets every group's lr for update `step_in_epoch` (counted in updates) of `epoch`, freezing
    first (apply_freeze), through the scheduler's step_update(absolute update index). Call it before
    each update; the lr depends on that index alone, so a resumed run (fresh optimizer and scheduler)
    continues exactly. Returns the absolute update index."""
    apply_freeze(scheduler.optimizer, epoch, freeze_epochs)
    num_updates = epoch * updates_per_epoch + step_in_epoch
    scheduler.step_update(num_updates)
    return num_updates


def create_ema(model, decay, device=None):
    """A timm ModelEmaV3 of `model` (parameters and buffers), or None when `decay` is None or 0.

    Create it after the model's weights are loaded and before wrapping the model in DDP. Decay
    warm-up is off (use_warmup False, update_after_step 0): update_ema() applies `decay` from the
    first update on. `device` (e.g. "cpu") keeps the average elsewhere to save accelerator memory."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=False, update_after_step=0, device=device)


def update_ema(ema, model):
    """EMA <- decay * EMA + (1 - decay) * model; call once per optimizer update (not per batch).

    No step is passed on purpose: ModelEmaV3.update(model, step=n) uses decay 0 (a plain copy) while
    n <= update_after_step + 1, so the first update would drop the starting weights; without a step
    the decay is constant, as in the ConvNeXt recipe, and nothing depends on the update count."""
    if ema is not None:
        ema.update(model)


def ema_state(ema):
    """The EMA weights for a checkpoint (store under EMA_KEY), or None without EMA."""
    return None if ema is None else ema.module.state_dict()


def restore_ema(ema, checkpoint):
    """Loads checkpoint[EMA_KEY] into `ema`. Returns False (EMA left as is: a copy of the model it was
    created from) when there is no EMA or the checkpoint has none; ValueError when it does not fit."""
    state = checkpoint.get(EMA_KEY)
    if ema is None or state is None:
        return False
    try:
        ema.module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's EMA weights do not fit the model ({str(e).splitlines()[0][:200]})")
    return True


def create_mixup(mixup, cutmix, smoothing, num_classes):
    """A timm Mixup (mixup alpha `mixup`, cutmix alpha `cutmix`, switching 50/50 when both are on,
    per batch) that also smooths the soft targets by `smoothing`; None when both alphas are 0.
    Called as `images, soft_targets = mixup(images, labels)`; it needs an even batch size."""
    if not mixup and not cutmix:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def clip_gradients(parameters, clip_grad, mode="norm"):
    """Clips gradients through timm's dispatch_clip_grad: mode "norm" (global norm <= clip_grad),
    "value" (each entry in [-clip_grad, clip_grad]) or "agc" (adaptive, clip_grad the ratio).
    Nothing when clip_grad is None or 0. With AMP, unscale the gradients (scaler.unscale_) first."""
    if clip_grad:
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad(parameters, clip_grad, mode=mode)


def check_recipe_args(opt, sched, epochs, warmup_epochs=0, min_lr=0.0, lr=None, warmup_lr=0.0, lr_decay=(),
                      ema_decay=None, smoothing=0.0, mixup=0.0, cutmix=0.0, update_freq=1, clip_grad=None,
                      clip_mode="norm", batch_size=None):
    """Raises ValueError with one sentence naming the flag for the first bad recipe argument."""
    mixing = bool(mixup or cutmix)
    checks = (
        (opt not in OPTIMIZERS, f"--opt must be one of {', '.join(OPTIMIZERS)} (got '{opt}')"),
        (sched not in SCHEDULES, f"--sched must be one of {', '.join(SCHEDULES)} (got '{sched}')"),
        (epochs < 1, f"--epochs must be at least 1 (got {epochs})"),
        (warmup_epochs < 0, f"--warmup_epochs must not be negative (got {warmup_epochs})"),
        (warmup_epochs >= epochs, f"--warmup_epochs ({warmup_epochs}) must be less than --epochs ({epochs})"),
        (lr is not None and lr < 0, f"--lr must not be negative (got {lr})"),
        (warmup_lr < 0, f"--warmup_lr must not be negative (got {warmup_lr})"),
        (min_lr < 0, f"--min_lr must not be negative (got {min_lr})"),
        (lr is not None and min_lr > lr, f"--min_lr ({min_lr}) must not exceed --lr ({lr})"),
        (any(m < 0 for m in lr_decay), f"--lr_decay epochs must not be negative (got {list(lr_decay)})"),
        (ema_decay is not None and not 0 <= ema_decay < 1, f"--ema_decay must be in [0, 1) (got {ema_decay})"),
        (not 0 <= smoothing < 1, f"--smoothing must be in [0, 1) (got {smoothing})"),
        (mixup < 0, f"--mixup alpha must not be negative (got {mixup})"),
        (cutmix < 0, f"--cutmix alpha must not be negative (got {cutmix})"),
        (mixing and batch_size is not None and batch_size % 2,
         f"--mixup/--cutmix need an even --batchsize (got {batch_size})"),
        (update_freq < 1, f"--update_freq must be at least 1 (got {update_freq})"),
        (clip_grad is not None and clip_grad < 0, f"--clip_grad must not be negative (got {clip_grad})"),
        (clip_mode not in CLIP_MODES, f"--clip_mode must be one of {', '.join(CLIP_MODES)} (got '{clip_mode}')"),
    )
    for bad, message in checks:
        if bad:
            raise ValueError(message)
