"""The run driver shared by every entry script: check the flags, build the model, then evaluate or train.
`run()` returns the metrics it printed (for scripts such as dynconv/scripts/cifar_results.py). The settings are
reconciled in utils/settings.py, evaluation and its figures are utils/evaluation.py, training utils/fit.py."""
import os
import random

import numpy as np
import torch

from dynconv import count_parameters
from dynconv.models import (Decides, ModelOptionError, UnknownModelOption, WeightsUnavailable, list_models,
                            model_config, model_family)
from dynconv.models import build_model as build_model_named
from dynconv.models.base import tiles_problem
from . import recipe
from .budgets import awareness_setup, budget_problems, run_targets
from .checkpoint import (BEST, LATEST, classifier_keys, filtered_weights, load_checkpoint, load_model_state,
                         load_weights)
from .cli import device_problem, range_problems, say_inert_settings
from .data import build_loaders, check_images, limited
from .distributed import finish, init_distributed, shutdown
from .errors import UserError
from .evaluation import evaluate
from .fit import PARAMETER_GROUPS, fit
from .rundir import check_run_dir, run_directory
from .settings import decides, reconcile, show


def check_args(args):
    """Everything that can be checked before any data is read: one clear line each."""
    problems = [
        (not (args.budget == -1 or 0 <= args.budget <= 1),
         f"--budget must be in [0, 1], or -1 for the static network (got {args.budget:g})"),
        (args.batchsize < 1, "--batchsize must be positive"),
        (args.plot_count < 1, f"--plot_count must be at least 1 (got {args.plot_count})"),
        (args.fast and not args.evaluate, "--fast is an evaluation mode: use it with -e"),
        (args.fast and not decides(args).gated,
         "--fast runs the sparse engine, which needs a model with gates; this one is static (budget -1)"),
        (args.plot_ponder and decides(args) is Decides.NOTHING,
         "--plot_ponder draws what the model decided per image; this model is static (budget -1)"),
        (args.plot_only and not (args.evaluate and args.plot_ponder), "--plot_only goes with -e --plot_ponder"),
        (args.amp and not args.device.startswith("cuda"), "--amp needs a CUDA device"),
        (device_problem(args.device) is not None, device_problem(args.device)),
        (any(v is not None and v <= 0 for v in (args.save_every_steps, args.save_every_minutes)),
         "--save_every_steps and --save_every_minutes must be positive"),
        (len(args.gumbel_temp) != len(args.gumbel_temp_epochs) + 1,
         "--gumbel_temp needs one value more than --gumbel_temp_epochs (a value per part of the schedule)"),
        (any(t <= 0 for t in args.gumbel_temp), "--gumbel_temp values must be positive"),
    ] + budget_problems(args) + _tiles_problems(args) + range_problems(args)
    if args.budget_targets and not args.evaluate:
        try:
            awareness_setup(args, args.model)  # the targets CSV and its row for the model, before any data
        except ValueError as e:
            raise UserError(str(e))
    unknown = sorted((set(args.lr_scale) | set(args.freeze)) - set(PARAMETER_GROUPS))
    problems.append((bool(unknown), f"unknown parameter group {', '.join(unknown)} "
                                    f"(groups: {', '.join(PARAMETER_GROUPS)})"))
    for bad, message in problems:
        if bad:
            raise UserError(message)
    try:
        if args.fast:
            from dynconv.sparse.ops import resolve_backend

            resolve_backend(args.backend, args.device)
        recipe.check_recipe_args(args.opt, args.sched, args.epochs, args.warmup_epochs, args.min_lr, args.lr,
                                 args.warmup_lr, args.lr_decay, args.model_ema_decay if args.model_ema else None,
                                 args.smoothing, args.mixup, args.cutmix, args.update_freq, args.clip_grad,
                                 batch_size=args.batchsize)
    except ValueError as e:
        raise UserError(str(e))


def _tiles_problems(args):
    """--tiles (a model option, in args.model_kwargs by now): one positive side per stage, and spatial gates."""
    tiles, options = args.model_kwargs.get("tiles"), model_config(args.model).options
    if tiles is None or "tiles" not in options:
        return []
    problem = tiles_problem(tiles, len(options["tiles"][0]))
    return [(problem is not None, f"--{problem} of {args.model}" if problem else None),
            (any(t != 1 for t in tiles) and decides(args) is not Decides.SPATIAL,
             "--tiles sets the tiles of spatial gates: add --budget or --budget_targets (this model is static)")]


def build_model(args, num_classes):
    """The model the flags describe (dynconv.models.build_model): spatial gates when --budget >= 0 (one per
    budget and block with --budget_targets), --model_kwargs with the model-option flags folded in."""
    try:
        return build_model_named(args.model, num_classes, spatial_gates=decides(args) is Decides.SPATIAL,
                                 targets=run_targets(args), options=args.model_kwargs, drop_path_rate=args.drop_path,
                                 tied_norms=args.tied_norms)
    except UnknownModelOption as e:
        raise UserError(f"--model_kwargs: {e}")
    except ModelOptionError as e:
        raise UserError(str(e))


def default_run_dir(family, model, budget, targets=()):
    """Where a new run goes without -s: under runs/, never where the shipped checkpoints are (exp/)."""
    if targets:
        return os.path.join("runs", family, model, "multi" + "-".join(f"{b:g}".replace(".", "") for b in targets))
    return os.path.join("runs", family, model, "base" if budget < 0 else f"sparse{budget:g}".replace(".", ""))


ENTRY = {"cifar": "main_cifar.py", "imagenet": "main_imagenet.py"}


def _same_dir(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def _saved_args(path):
    try:
        return load_checkpoint(path).get("args") or {}
    except UserError:
        return {}


def find_checkpoint(args):
    """The checkpoint to start from (None: a new training run). A directory means its checkpoint_best.pth for
    evaluation and its checkpoint.pth for training."""
    if args.resume is None:
        if args.evaluate:
            raise UserError("-e/--evaluate needs a checkpoint: pass -r FILE (or a run directory)")
        return None
    if os.path.isdir(args.resume):
        names = (BEST, LATEST) if args.evaluate else (LATEST,)
        path = next((os.path.join(args.resume, n) for n in names if os.path.isfile(os.path.join(args.resume, n))),
                    None)
        if path is None and args.evaluate:
            raise UserError(f"no checkpoint at {args.resume} (looked for {' and '.join(names)})")
        return path
    if not os.path.isfile(args.resume):
        if args.evaluate or args.resume.endswith(".pth"):
            raise UserError(f"no checkpoint at {args.resume}")
        return None  # a run directory that does not exist yet: a new run
    return args.resume


def _describe(args):
    kind = decides(args)
    if kind is Decides.NOTHING:
        return "dense"
    if kind is not Decides.SPATIAL:
        return ("its own gates" if kind is Decides.OWN else "no gates") + (f"; {show(args.model_kwargs)}"
                                                                       if args.model_kwargs else "")
    tiles = args.model_kwargs.get("tiles", ())
    tiles = f", tiles {show(tiles)}" if any(t != 1 for t in tiles) else ""
    if args.budget_targets:
        return "DynConv, multi-target: budgets " + ", ".join(f"{b:g}" for b in run_targets(args)) + tiles
    return f"DynConv, budget {args.budget:g}{tiles}"


def _trial(train_set, val_set, full, args):
    """The quick trial's share of the data, for the run's first line ('' for a full run)."""
    parts = [f"{name} {len(s)} of {n} images (--limit_{name}_batches {getattr(args, f'limit_{name}_batches'):g})"
             for name, s, n in (("train", train_set, full[0]), ("val", val_set, full[1]))
             if args.get(f"limit_{name}_batches") is not None and (name == "val" or not args.evaluate)]
    return "; quick trial: " + ", ".join(parts) if parts else ""


def _is_complete(checkpoint, args):
    return int(checkpoint.get("epoch", 0)) >= args.epochs and not checkpoint.get("step")


def run(args, family, make_datasets, topk=(1,), explicit=None, default_model=None):
    """The whole CLI run: check, build, resume, then evaluate or train. `make_datasets(args, config) ->
    (train, val, num_classes)`; `explicit`: the flags given on the command line (utils.cli.parse). Returns the
    metrics (evaluation, or the last epoch's with best_prec1)."""
    explicit = set(vars(args)) if explicit is None else explicit
    checkpoint_path = find_checkpoint(args)
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    args = reconcile(args, explicit, checkpoint, default_model or args.model)  # frozen from here on
    if model_family(args.model) != family:
        raise UserError(f"{args.model} is a {model_family(args.model)} model; this script runs {family} models")
    config = model_config(args.model)
    say_inert_settings(args)
    check_args(args)
    resolution = args.get("resolution")  # the entry scripts' flag
    if resolution is not None and resolution < 1:
        raise UserError(f"--resolution must be positive (got {resolution})")
    if resolution and resolution % config.input_multiple:
        raise UserError(f"--resolution {resolution} is not a multiple of {config.input_multiple}, the total stride "
                        f"of {args.model}")
    run_dir = args.save_dir or (os.path.dirname(checkpoint_path) if checkpoint_path else
                                default_run_dir(family, args.model, args.budget, run_targets(args)))
    if not args.evaluate and (checkpoint is None or not _same_dir(run_dir, os.path.dirname(checkpoint_path))):
        check_run_dir(run_dir, args.overwrite, args, explicit, ENTRY[family], _saved_args)
    if checkpoint_path and args.evaluate:
        print(f"=> evaluating {checkpoint_path}")
    if checkpoint is not None and not args.evaluate and _is_complete(checkpoint, args):
        print(f"=> the run in {run_dir} is complete ({checkpoint['epoch']} of {args.epochs} epochs): nothing to "
              "train; evaluate it with -e, or raise --epochs to train on")
        return {"epoch": int(checkpoint["epoch"]), "best_prec1": float(checkpoint.get("best_prec1", 0.0))}
    with run_directory(run_dir, active=not args.evaluate and os.environ.get("RANK", "0") == "0"):
        ctx = init_distributed(args.device)
        try:
            result = _run(args, family, config, make_datasets, topk, (checkpoint_path, checkpoint), run_dir, ctx)
            finish(ctx)
            return result
        finally:
            shutdown(ctx)


def _run(args, family, config, make_datasets, topk, checkpoint, run_dir, ctx):
    checkpoint_path, checkpoint = checkpoint
    torch.manual_seed(args.seed + ctx.rank)
    torch.set_flush_denormal(True)  # denormal gradients slow CPU arithmetic many times over
    random.seed(args.seed + ctx.rank)
    np.random.seed(args.seed + ctx.rank)  # timm's mixup draws from numpy
    train_set, val_set, num_classes = make_datasets(args, config)
    if num_classes < 2:  # one class trains to "Prec@1 100.000", a number that means nothing
        raise UserError(f"{args.data} has {num_classes} class: training and evaluation need at least two")
    full = len(train_set), len(val_set)
    train_set = limited(train_set, args.get("limit_train_batches"), args.batchsize, args.seed)
    val_set = limited(val_set, args.get("limit_val_batches"), args.batchsize)
    check_images([val_set] if args.evaluate else [train_set, val_set], args.workers)
    # channels-last: about 1.3x faster training on CPU (oneDNN) and the layout tensor cores want on GPUs
    model = build_model(args, num_classes).to(ctx.device, memory_format=torch.channels_last)
    if args.pretrained:
        load_pretrained(model, args, config)
    if checkpoint is not None:
        load_weights(model, config, checkpoint["state_dict"], checkpoint_path)
    if ctx.is_main:
        print(f"=> {args.model} ({_describe(args)}), {count_parameters(model):,} parameters" +
              (f", from {checkpoint_path}" if checkpoint else "") + _trial(train_set, val_set, full, args))
    train_loader, val_loader = build_loaders(train_set, val_set, args.batchsize, args.workers, ctx, args.seed)
    if args.evaluate:
        return evaluate(model, val_loader, val_set, checkpoint, args, topk, run_dir, ctx)
    teacher = load_teacher(args, num_classes, ctx)
    return fit(model, (train_loader, val_loader, val_set, num_classes), checkpoint, args, topk, run_dir, ctx,
               teacher)


def restore_model(args, family, make_datasets, explicit):
    """(model, validation set, settings) of an evaluation command's flags (-r CHECKPOINT -e ...), built and
    loaded as run() builds them, in eval mode on the CPU, channels-last: for tools that time or inspect trained
    models (dynconv/scripts/compare.py)."""
    path = find_checkpoint(args)
    checkpoint = load_checkpoint(path)
    args = reconcile(args, explicit, checkpoint, args.model)
    config = model_config(args.model)
    _, val_set, num_classes = make_datasets(args, config)
    model = build_model(args, num_classes)
    load_weights(model, config, checkpoint["state_dict"], path)
    return model.eval().to(memory_format=torch.channels_last), val_set, args


def load_teacher(args, num_classes, ctx):
    """The distillation teacher (dense, eval mode, no gradients): --teacher_model (default --model) with
    --teacher_weights, or its published weights; None without either flag or with --teacher_model none. Weights
    that cannot be loaded are an error, never a teacher with random weights."""
    if args.teacher_model == "none" or (args.teacher_model is None and args.teacher_weights is None):
        return None
    name = args.teacher_model or args.model
    if name not in list_models():
        raise UserError(f"--teacher_model {name} is not a model of the registry ({', '.join(list_models())})")
    config = model_config(name)
    if args.teacher_weights is None:
        if config.pretrained is None:
            raise UserError(f"--teacher_model {name} has no published weights: give --teacher_weights PATH")
        try:
            state_dict, source = config.pretrained(name), f"the published {name} weights"
        except WeightsUnavailable as e:
            raise UserError(str(e))
    else:
        state_dict, source = load_checkpoint(args.teacher_weights)["state_dict"], args.teacher_weights
    teacher = build_model_named(name, num_classes)
    state_dict = filtered_weights(teacher, config, state_dict, source)
    weight = next(k for k in classifier_keys(teacher) if k.endswith("weight"))
    if weight in state_dict and state_dict[weight].shape[0] != num_classes:
        raise UserError(f"the teacher ({source}) classifies {state_dict[weight].shape[0]} classes, the data set has "
                        f"{num_classes}")
    load_model_state(teacher, state_dict, source)
    if ctx.is_main:
        print(f"=> distilling from {name} ({source}), T {args.T_kd:g}, weight {args.kd_weight:g}")
    return teacher.to(ctx.device, memory_format=torch.channels_last).eval().requires_grad_(False)


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
    load_weights(model, config, state_dict, source, fresh_gates=True, new_classifier=True)
