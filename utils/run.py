"""The run driver shared by every entry script: check the flags, build the model, then evaluate or train.
`run()` returns the metrics it printed (for scripts such as scripts/cifar_results.py)."""
import os
import random

import numpy as np
import torch
from tqdm import tqdm

from dynconv import MaskUnit, SpatialDecision, count_parameters, set_gate_schedule
from dynconv.gates import gate_state_keys
from dynconv.objectives import DecisionLosses, Loss, Sparsity, TaskLoss
from models import WeightsUnavailable, create_model, model_config
from . import recipe
from .checkpoint import (BEST, BEST_EMA, EMA, LATEST, load_checkpoint, load_model_state, resolve_checkpoint,
                         restore_rng, rng_state, save_checkpoint)
from .cli import apply_recipe
from .data import build_loaders, first_images
from .distributed import broadcast_buffers, init_distributed, shutdown
from .errors import UserError
from .logger import RunLogger
from .training import TrainSetup, print_eval, train_one_epoch, validate

PARAMETER_GROUPS = ("gates", "backbone")  # the gates' parameters, and everything else


def check_args(args):
    """Everything that can be checked before any data is read: one clear line each."""
    if not (args.budget == -1 or 0 <= args.budget <= 1):
        raise UserError(f"--budget must be in [0, 1], or -1 for the static network (got {args.budget:g})")
    if args.batchsize < 1:
        raise UserError("--batchsize must be positive")
    if args.fast and not args.evaluate:
        raise UserError("--fast is an evaluation mode: use it with -e")
    if args.fast and args.budget < 0:
        raise UserError("--fast runs the sparse engine, which needs a dynamic model: pass the checkpoint's --budget")
    if args.amp and not args.device.startswith("cuda"):
        raise UserError("--amp needs a CUDA device")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} requested but CUDA is not available here; use --device cpu")
    unknown = sorted((set(args.lr_scale) | set(args.freeze)) - set(PARAMETER_GROUPS))
    if unknown:
        raise UserError(f"unknown parameter group {', '.join(unknown)} (groups: {', '.join(PARAMETER_GROUPS)})")
    try:
        recipe.check_recipe_args(args.opt, args.sched, args.epochs, args.warmup_epochs, args.min_lr, args.lr,
                                 args.warmup_lr, args.lr_decay, args.model_ema_decay if args.model_ema else None,
                                 args.smoothing, args.mixup, args.cutmix, args.update_freq, args.clip_grad,
                                 batch_size=args.batchsize)
    except ValueError as e:
        raise UserError(str(e))


def build_model(args, family, num_classes):
    """The model the flags describe: a MaskUnit gate per block when --budget >= 0, --model_kwargs for its factory."""
    kwargs = dict(args.model_kwargs)
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    gate_layer = MaskUnit if args.budget >= 0 else None
    try:
        return create_model(args.model, family, gate_layer=gate_layer, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"--model_kwargs: {args.model} does not take {str(e).split('argument')[-1].strip()}")
        raise


def default_run_dir(family, model, budget):
    return os.path.join("exp", family, model, "base" if budget < 0 else f"sparse{budget:g}".replace(".", ""))


def _check_writable(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to save directory {directory} ({e.strerror})")


def _find_checkpoint(args):
    """The checkpoint to start from, or None for a new training run."""
    if args.resume is None:
        if args.evaluate:
            raise UserError("-e/--evaluate needs a checkpoint: pass -r FILE (or a run directory)")
        return None
    path = resolve_checkpoint(args.resume)
    if path is None and (args.evaluate or os.path.isfile(args.resume) or args.resume.endswith(".pth")):
        raise UserError(f"no checkpoint at {args.resume}")
    return path


def run(args, family, make_datasets, topk=(1,)):
    """The whole CLI run: check, build, resume, then evaluate or train. `make_datasets(args, config) ->
    (train, val, num_classes)`. Returns the metrics (evaluation, or the last epoch's with best_prec1)."""
    config = model_config(args.model)
    apply_recipe(args, config.recipe)
    check_args(args)
    checkpoint_path = _find_checkpoint(args)
    run_dir = args.save_dir or (os.path.dirname(checkpoint_path) if args.evaluate else
                                default_run_dir(family, args.model, args.budget))
    ctx = init_distributed(args.device)
    try:
        return _run(args, family, config, make_datasets, topk, checkpoint_path, run_dir, ctx)
    finally:
        shutdown(ctx)


def _run(args, family, config, make_datasets, topk, checkpoint_path, run_dir, ctx):
    torch.manual_seed(args.seed + ctx.rank)
    torch.set_flush_denormal(True)  # denormal gradients slow CPU arithmetic many times over
    random.seed(args.seed + ctx.rank)
    np.random.seed(args.seed + ctx.rank)  # timm's mixup draws from numpy
    if ctx.is_main and not args.evaluate:
        _check_writable(run_dir)
    train_set, val_set, num_classes = make_datasets(args, config)
    # channels-last: about 1.3x faster training on CPU (oneDNN) and the layout tensor cores want on GPUs
    model = build_model(args, family, num_classes).to(ctx.device, memory_format=torch.channels_last)
    if args.pretrained:
        load_pretrained(model, args, config)
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        load_model_state(model, config.checkpoint_filter(checkpoint["state_dict"], model), checkpoint_path)
    if ctx.is_main:
        print(f"=> {args.model} ({'DynConv, budget %g' % args.budget if args.budget >= 0 else 'dense'}), "
              f"{count_parameters(model):,} parameters" + (f", from {checkpoint_path}" if checkpoint else ""))
    train_loader, val_loader, train_sampler = build_loaders(train_set, val_set, args.batchsize, args.workers, ctx)
    if args.evaluate:
        return evaluate(model, val_loader, val_set, checkpoint, args, topk, run_dir, ctx)
    data = (train_loader, val_loader, train_sampler, val_set, num_classes)
    return fit(model, data, checkpoint, args, topk, run_dir, ctx)


def load_pretrained(model, args, config):
    """--pretrained: the model's published weights; --pretrained PATH: a local state dict or checkpoint. Gates
    keep their fresh initialisation; the classifier too when the number of classes differs."""
    if args.pretrained is True:
        if config.pretrained is None:
            raise UserError(f"--pretrained needs a checkpoint path for {args.model} (no published weights to fetch)")
        try:
            state_dict, source = config.pretrained(args.model), f"the published {args.model} weights"
        except WeightsUnavailable as e:
            raise UserError(str(e))
    else:
        state_dict, source = load_checkpoint(args.pretrained)["state_dict"], args.pretrained
    state_dict = config.checkpoint_filter(state_dict, model)
    allow_missing = gate_state_keys(model)
    classifier = set(_classifier_keys(model))
    own = model.state_dict()
    if any(k in state_dict and state_dict[k].shape != own[k].shape for k in classifier):
        state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
        allow_missing |= classifier
    load_model_state(model, state_dict, source, allow_missing=allow_missing)


def _classifier_keys(model):
    """State-dict keys of the model's classifier (timm's get_classifier())."""
    classifier = model.get_classifier()
    prefix = next(name for name, m in model.named_modules() if m is classifier)
    return [f"{prefix}.{k}" for k in classifier.state_dict()]


def evaluate(model, val_loader, val_set, checkpoint, args, topk, run_dir, ctx):
    """-e: Prec@k and MMac of the checkpoint (with --fast also through the sparse engine); prints the lines."""
    show = ctx.is_main
    if args.fast:
        metrics = evaluate_fast(model, val_loader, ctx, topk, args, show)
    else:
        metrics = validate(model, val_loader, ctx, topk, args.full_macs, args.amp, show)
    metrics["epoch"] = int(checkpoint.get("epoch", 0))
    if ctx.is_main:
        print_eval(metrics["epoch"], metrics)
        if args.plot_ponder:
            plot_ponder(model, val_set, args, run_dir, ctx)
    return metrics


def evaluate_fast(model, loader, ctx, topk, args, show):
    """-e --fast: the masked-dense pass (Prec@k, MMac, speed), then the sparse engine (Prec@k, speed).
    Prints the engine's accuracy; the two must agree (the engine computes the same function)."""
    from dynconv.sparse.engine import SparseEngine

    try:
        engine = SparseEngine(model.eval(), backend=args.backend)
    except ValueError as e:
        raise UserError(str(e))
    reference = validate(model, loader, ctx, topk, args.full_macs, args.amp, show, timed=True)
    fast = validate(model, loader, ctx, topk, amp=args.amp, show_progress=show, forward=engine, timed=True)
    return {**reference, **{k: fast[k] for k in fast if k.startswith("prec")},
            "reference_prec1": reference["prec1"], "reference_images_per_s": reference["images_per_s"],
            "images_per_s": fast["images_per_s"], "backend": engine.backend}


@torch.no_grad()
def plot_ponder(model, val_set, args, run_dir, ctx):
    from .plot import save_ponder_plots

    model.eval()
    images = first_images(val_set, args.plot_count)
    _, decisions = model(images.to(ctx.device))
    masks = [d for d in decisions if isinstance(d, SpatialDecision)]
    if not masks:
        raise UserError("--plot_ponder needs a model with spatial gates (this one has none)")
    config = model_config(args.model)
    out_dir = args.plot_dir or os.path.join(run_dir, "ponder")
    paths = save_ponder_plots(images, masks, out_dir, config.mean, config.std)
    print(f"=> {len(paths)} ponder plots written to {out_dir}")


# ---- training ----

def build_setup(model, args, num_classes, updates_per_epoch, ctx):
    """Optimizer (parameter groups gates/backbone), per-iteration schedule, EMA, mixup and the loss terms."""
    gates = gate_state_keys(model)
    groups = recipe.param_groups(model, args.weight_decay, args.lr_scale,
                                 group_of=lambda name: "gates" if name in gates else "backbone",
                                 no_weight_decay_norm_bias=args.no_wd_norm_bias)
    optimizer = recipe.create_optimizer(groups, args.opt, args.lr, args.weight_decay, args.momentum)
    scheduler = recipe.create_scheduler(optimizer, args.sched, args.epochs, updates_per_epoch, args.lr_decay,
                                        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                        min_lr=args.min_lr)
    mixup = recipe.create_mixup(args.mixup, args.cutmix, args.smoothing, num_classes)
    terms = [TaskLoss(0.0 if mixup else args.smoothing), DecisionLosses()]
    if args.budget >= 0:
        terms.append(Sparsity(args.budget, args.epochs, args.sparsity_weight))
    return TrainSetup(optimizer, scheduler, torch.amp.GradScaler(ctx.device.type, enabled=args.amp), Loss(terms),
                      ema=recipe.create_ema(model, args.model_ema_decay) if args.model_ema else None,
                      mixup=mixup, update_freq=args.update_freq, clip_grad=args.clip_grad, amp=args.amp,
                      freeze=args.freeze)


def gumbel_noise_on(epoch, args):
    """The reference's rule: noise while not (epoch > fraction * epochs), epoch 0-based (30 epochs: off from 25)."""
    return not epoch > args.gumbel_noise_epochs * args.epochs


def _resume(setup, model, checkpoint, checkpoint_path, ctx):
    """Optimizer and EMA state from the checkpoint; returns (start epoch, best Prec@1, best EMA Prec@1)."""
    if checkpoint is None:
        return 0, 0.0, 0.0
    try:
        setup.optimizer.load_state_dict(checkpoint["optimizer"])
        recipe.restore_ema(setup.ema, checkpoint)
    except (KeyError, ValueError) as e:
        raise UserError(f"{checkpoint_path} cannot resume training: optimizer state missing or "
                        f"incompatible ({type(e).__name__}: {e})")
    start = int(checkpoint.get("epoch", 0))
    if "rng" in checkpoint and not ctx.distributed:  # under torchrun each process keeps its own seed
        restore_rng(checkpoint["rng"])
    if ctx.is_main:
        print(f"=> resuming at epoch {start + 1}")
    return start, float(checkpoint.get("best_prec1", 0.0)), float(checkpoint.get("best_ema_prec1", 0.0))


def fit(model, data, checkpoint, args, topk, run_dir, ctx):
    """Trains from the checkpoint's epoch to --epochs; evaluates (and the EMA) and saves after every epoch."""
    train_loader, val_loader, train_sampler, val_set, num_classes = data
    setup = build_setup(model, args, num_classes, recipe.count_updates(len(train_loader), args.update_freq), ctx)
    start, best, best_ema = _resume(setup, model, checkpoint, args.resume, ctx)
    train_model = model
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    logger = RunLogger(args.log_dir or os.path.join(run_dir, "tb"), os.path.join(run_dir, "log.jsonl"), ctx.is_main)
    metrics = {}
    for epoch in tqdm(range(start, args.epochs), desc="training", initial=start, total=args.epochs,
                      disable=None if ctx.is_main else True):
        set_gate_schedule(model, noise=gumbel_noise_on(epoch, args), temperature=args.gumbel_temp)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(train_model, train_loader, setup, epoch, ctx, ctx.is_main)
        broadcast_buffers(model, ctx)  # the checkpoint holds rank 0's BN statistics: evaluate exactly that
        metrics = validate(model, val_loader, ctx, topk, False, args.amp, ctx.is_main)
        best = max(best, metrics["prec1"])
        ema_metrics = _validate_ema(setup.ema, val_loader, ctx, topk, args)
        best_ema = max(best_ema, ema_metrics.get("prec1", 0.0))
        if ctx.is_main:
            _report_epoch(epoch, train_metrics, metrics, ema_metrics, best, logger)
            _save_epoch(model, setup, args, run_dir, epoch, metrics, ema_metrics, best, best_ema)
    logger.close()
    if ctx.is_main:
        print(f"=> done: best Prec@1 {best:.3f}; checkpoints in {run_dir}")
        if args.plot_ponder:
            plot_ponder(model, val_set, args, run_dir, ctx)
    return {**metrics, "best_prec1": best, **({"best_ema_prec1": best_ema} if setup.ema is not None else {})}


def _validate_ema(ema, val_loader, ctx, topk, args):
    if ema is None:
        return {}
    return validate(ema.module, val_loader, ctx, topk, False, args.amp, ctx.is_main)


def _report_epoch(epoch, train_metrics, metrics, ema_metrics, best, logger):
    ema = f", EMA Prec@1 {ema_metrics['prec1']:.3f}" if ema_metrics else ""
    tqdm.write(f"* Epoch {epoch + 1} - Prec@1 {metrics['prec1']:.3f}  (task loss {train_metrics['task_loss']:.4f}, "
               f"MMac {metrics['mmac']:.3f}, lr {train_metrics['lr']:g}{ema})")
    logger.log(epoch + 1, train_metrics, "train")
    logger.log(epoch + 1, {**metrics, "best_prec1": best}, "val")
    if ema_metrics:
        logger.log(epoch + 1, ema_metrics, "val_ema")


def _save_epoch(model, setup, args, run_dir, epoch, metrics, ema_metrics, best, best_ema):
    """checkpoint.pth (resumable: optimizer and EMA state), checkpoint_best.pth, and the EMA's own pair."""
    common = {"epoch": epoch + 1, "args": dict(vars(args)), "version": 2}
    state = {"state_dict": model.state_dict(), "optimizer": setup.optimizer.state_dict(), "best_prec1": best,
             "prec1": metrics["prec1"], "mmac": metrics["mmac"], "rng": rng_state(), **common}
    if setup.ema is not None:
        state.update({recipe.EMA_KEY: recipe.ema_state(setup.ema), "best_ema_prec1": best_ema})
    save_checkpoint(state, os.path.join(run_dir, LATEST))
    if metrics["prec1"] >= best:
        save_checkpoint(state, os.path.join(run_dir, BEST))
    if setup.ema is not None:
        ema_state = {"state_dict": recipe.ema_state(setup.ema), "prec1": ema_metrics["prec1"],
                     "mmac": ema_metrics["mmac"], "best_prec1": best_ema, "ema": True, **common}
        save_checkpoint(ema_state, os.path.join(run_dir, EMA))
        if ema_metrics["prec1"] >= best_ema:
            save_checkpoint(ema_state, os.path.join(run_dir, BEST_EMA))
