"""The command-line flags both entry scripts share (the reference's names and defaults, timm's names for the
training-recipe flags the reference lacks).

Recipe flags default to None on the command line and are then filled from the model's own recipe
(ModelConfig.recipe, e.g. SGD with steps for the ResNets) and, for what that leaves open, from RECIPE_DEFAULTS:
a bare command trains a model with its paper's recipe.
"""
import argparse
import ast
import math
import sys

import torch

from dynconv.sparse.ops import BACKENDS
from .recipe import OPTIMIZERS, SCHEDULES

RECIPE_DEFAULTS = dict(opt="sgd", lr=0.1, momentum=0.9, sched="step", lr_decay=[], weight_decay=1e-4,
                       batchsize=64, epochs=100, warmup_epochs=0, warmup_lr=0.0, min_lr=0.0, mixup=0.0,
                       cutmix=0.0, smoothing=0.0, auto_augment="none", model_ema=False, model_ema_decay=0.9998, drop_path=0.0,
                       clip_grad=None, update_freq=1, lr_scale={}, freeze={}, no_wd_norm_bias=False,
                       gumbel_temp=[1.0], gumbel_temp_epochs=[], gumbel_noise_epochs=0.8, sparsity_weight=10.0,
                       teacher_model=None, teacher_weights=None, T_kd=20.0, kd_weight=0.01, awareness_metric=None,
                       performance_targets_csv=None)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """-h shows every default (the recipe flags: the default model's recipe), and the examples as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help  # "(default: None)" says nothing: those flags state their default themselves
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (no usage block) and exit code 2; -h shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def finite_float(text):
    """argparse type of every float flag: a number, never nan or inf (nan passes every `x <= 0` check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def batch_limit(text):
    """--limit_*_batches: an int (minibatches) or a float in (0, 1] (a fraction of the split), as Lightning."""
    try:
        value = int(text)
    except ValueError:
        value = finite_float(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got '{text}'")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"a number of batches must be at least 1, got '{text}'")
    return value


def say_inert_settings(args):
    """Settings that are allowed but train nothing get a line (never silently): --lr 0 keeps the weights (a test
    of the data path or of BN statistics may want exactly that)."""
    if not args.evaluate and args.lr == 0:
        print("=> --lr 0: the weights will not change (only the BatchNorm statistics)")


def range_problems(args):
    """(bad, message) pairs for the numeric flags with a range that utils.recipe does not check, after the
    recipe has filled them in."""
    decay = list(args.lr_decay)
    return [
        (args.workers < 0, f"--workers must not be negative (got {args.workers})"),
        (not 0 <= args.momentum < 1, f"--momentum must be in [0, 1) (got {args.momentum:g})"),
        (args.opt == "nesterov" and args.momentum == 0, "--opt nesterov needs a --momentum above 0"),
        (args.weight_decay < 0, f"--weight_decay must not be negative (got {args.weight_decay:g})"),
        (decay != sorted(set(decay)), f"--lr_decay epochs must be increasing (got {' '.join(map(str, decay))})"),
        (not 0 <= args.drop_path < 1, f"--drop_path must be in [0, 1) (got {args.drop_path:g})"),
        (args.T_kd <= 0, f"--T_kd must be positive (got {args.T_kd:g})"),
        (args.kd_weight < 0 or args.sparsity_weight < 0, "--kd_weight and --sparsity_weight must not be negative"),
        (args.gumbel_noise_epochs < 0, f"--gumbel_noise_epochs must not be negative (got {args.gumbel_noise_epochs:g})"),
        (list(args.gumbel_temp_epochs) != sorted(args.gumbel_temp_epochs)
         or any(not 0 <= f <= 1 for f in args.gumbel_temp_epochs),
         "--gumbel_temp_epochs must be increasing fractions in [0, 1]"),
        (any(v < 0 for v in list(args.lr_scale.values()) + list(args.freeze.values())),
         "--lr_scale and --freeze values must not be negative"),
    ]


def device_problem(name):
    """Why --device `name` cannot be used here (one sentence), or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name} is not a device name (e.g. cpu, cuda, cuda:1)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name} requested but CUDA is not available here; use --device cpu"
    return None


def parse(parser, argv=None):
    """(args, explicit): the parsed flags and the names of those given on the command line (the rest may come
    from a checkpoint or the model's recipe)."""
    args = parser.parse_args(argv)
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        explicit = set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
    return args, explicit


def _value(text):
    """A flag value as a Python literal where it is one (numbers, lists, True), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def key_values(kind=_value):
    """argparse type for one KEY=VALUE item; KeyValues collects them into a dict."""
    def parse(text):
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
        return key, kind(value)
    return parse


class KeyValues(argparse.Action):
    """`nargs='*'` KEY=VALUE items stored as a dict (as the recipes and checkpoints hold them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def model_options():
    """Every registered model's options (ModelConfig.options): name -> (default, help, model names)."""
    from dynconv.models import list_models, model_config

    options = {}
    for model in list_models():
        for name, (default, help) in model_config(model).options.items():
            options.setdefault(name, (default, help, []))[2].append(model)
    return options


def _shown_defaults(name):
    """The defaults of option `name` as -h shows them: each distinct one (e.g. tiles per stage: 1 1 1 or 1 1 1 1)."""
    from dynconv.models import list_models, model_config

    shown = []
    for model in list_models():
        default = model_config(model).options.get(name, (None,))[0]
        text = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else f"{default}"
        if name in model_config(model).options and text not in shown:
            shown.append(text)
    return " or ".join(shown)


def _add_model_option_flags(p):
    """A flag per model option (e.g. DGC's --heads); None = the model's default. Only the models that have an
    option take its flag; the values go to the checkpoint with --model_kwargs."""
    g = p.add_argument_group("model options", "options of some models (default: the model's own; with -r, the "
                                              "checkpoint's)")
    for name, (default, help, models) in sorted(model_options().items()):
        many = isinstance(default, (tuple, list))
        kind = type(default[0]) if many else type(default)
        g.add_argument(f"--{name}", type=kind, nargs="+" if many else None, default=None,
                       help=f"{help} ({', '.join(models)}; default {_shown_defaults(name)})")


def _add_recipe_flags(p):
    """The training recipe (timm's flag names); None = the model's recipe, then RECIPE_DEFAULTS."""
    g = p.add_argument_group("training recipe", "None = the model's own recipe (e.g. the DynConv reference's "
                             "SGD and steps for the ResNets); on resume, the checkpoint's")
    g.add_argument("--opt", choices=OPTIMIZERS, help="optimizer: sgd (classical momentum, the reference's), "
                   "nesterov (SGD with Nesterov momentum) or adamw")
    g.add_argument("--lr", type=finite_float, help="initial (peak) learning rate")
    g.add_argument("--momentum", type=finite_float, help="SGD momentum")
    g.add_argument("--weight_decay", type=finite_float, help="weight decay (decoupled for adamw)")
    g.add_argument("--no_wd_norm_bias", action="store_true", default=None,
                   help="no weight decay on norm weights and biases")
    g.add_argument("--sched", choices=SCHEDULES, help="step (lr / 10 at --lr_decay epochs) or cosine; both "
                   "stepped per iteration")
    g.add_argument("--lr_decay", type=int, nargs="*", help="step schedule: epochs at which the lr is divided by 10")
    g.add_argument("--warmup_epochs", type=finite_float, help="linear warm-up from --warmup_lr (cosine)")
    g.add_argument("--warmup_lr", type=finite_float, help="learning rate the warm-up starts from")
    g.add_argument("--min_lr", type=finite_float, help="cosine schedule: the final learning rate")
    g.add_argument("--lr_scale", type=key_values(finite_float), nargs="*", action=KeyValues, metavar="GROUP=SCALE",
                   help="learning-rate scale per parameter group: gates (the gates' parameters) and backbone")
    g.add_argument("--freeze", type=key_values(finite_float), nargs="*", action=KeyValues, metavar="GROUP=EPOCHS",
                   help="learning rate 0 for a group during its first EPOCHS epochs, e.g. backbone=5")
    g.add_argument("--batchsize", type=int, help="batch size (per process)")
    g.add_argument("--update_freq", type=int, help="minibatches per optimizer update (gradient accumulation)")
    g.add_argument("--epochs", type=int, help="epochs to train (on resume: the total, not the ones left)")
    g.add_argument("--mixup", type=finite_float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=finite_float, help="cutmix alpha (0: off)")
    g.add_argument("--smoothing", type=finite_float, help="label smoothing")
    g.add_argument("--auto_augment", choices=["none", "imagenet"],
                   help="AutoAugment policy of the training images (torchvision's; main_imagenet.py)")
    g.add_argument("--model_ema", action="store_true", default=None,
                   help="keep an EMA of the weights, evaluated and saved beside the model")
    g.add_argument("--model_ema_decay", type=finite_float, help="EMA decay per optimizer update")
    g.add_argument("--drop_path", type=finite_float, help="stochastic depth rate (of the last block)")
    g.add_argument("--clip_grad", type=finite_float, help="clip the gradients' global norm to this value")
    g.add_argument("--gumbel_temp", type=finite_float, nargs="+", metavar="T",
                   help="Gumbel-softmax temperature; several values form a schedule with --gumbel_temp_epochs")
    g.add_argument("--gumbel_temp_epochs", type=finite_float, nargs="*", metavar="FRACTION",
                   help="fractions of the epochs at which the next --gumbel_temp value starts (one fewer than them)")
    g.add_argument("--gumbel_noise_epochs", type=finite_float,
                   help="fraction of the epochs trained with Gumbel noise (noise while epoch <= fraction * epochs)")
    g.add_argument("--sparsity_weight", type=finite_float, help="weight of the sparsity criterion")


def _add_budget_aware_flags(p):
    """Distillation and the multi-target models' budget awareness (the budget-aware paper's names)."""
    g = p.add_argument_group("distillation and budget awareness", "None = the recipe's; on resume, the checkpoint's")
    g.add_argument("--teacher_model", metavar="NAME", help="distil from this dense network (its published weights, "
                   "or --teacher_weights); default with --teacher_weights: --model; none: no distillation")
    g.add_argument("--teacher_weights", metavar="PATH", help="the teacher's weights (a checkpoint of ours, a timm "
                   "or torchvision state dict)")
    g.add_argument("--T_kd", type=finite_float, help="distillation temperature")
    g.add_argument("--kd_weight", type=finite_float, help="weight of the distillation term")
    g.add_argument("--awareness_metric", choices=("l1", "l2", "none"), help="multi-target: per-budget loss weights "
                   "from each budget's validation Prec@1 against its target (default: l2 when the targets CSV has "
                   "the model, else none)")
    g.add_argument("--tied_norms", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-target: the per-budget norms share one weight and bias, each keeping its own running "
                        "statistics (default: tied when the run starts from --pretrained weights, the budget-aware "
                        "code's choice, else one affine per budget); with -r, the checkpoint's")
    g.add_argument("--performance_targets_csv", metavar="CSV", help="multi-target: Prec@1 targets per model and "
                   "budget (default: dynconv/configs/performance_targets.csv, the budget-aware paper's ImageNet numbers)")


def _add_run_flags(p, defaults, data_aliases):
    p.add_argument("-s", "--save_dir", default=None,
                   help="run directory for checkpoints, logs and plots "
                        "(default runs/<dataset>/<model>/<base|sparseBB>; with -r DIR, DIR)")
    p.add_argument("-r", "--resume", default=None,
                   help="checkpoint file, or a directory holding checkpoint.pth (a directory without one starts a new run)")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate the checkpoint given with -r (a directory: its checkpoint_best.pth)")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace the checkpoints of another run in its directory")
    p.add_argument("--save_every_steps", type=int, default=None,
                   help="also write a resumable checkpoint every N optimizer updates within an epoch")
    p.add_argument("--save_every_minutes", type=finite_float, default=None,
                   help="also write a resumable checkpoint every M minutes within an epoch")
    p.add_argument("--limit_train_batches", type=batch_limit, default=None, metavar="N|FRACTION",
                   help="quick trial: train on N minibatches per epoch (an int) or a fraction of the training set "
                        "(a float in (0, 1]); a fixed random subset, recorded in the checkpoint (Lightning's name)")
    p.add_argument("--limit_val_batches", type=batch_limit, default=None, metavar="N|FRACTION",
                   help="quick trial: evaluate on N minibatches or a fraction of the validation set")
    p.add_argument("--plot_ponder", action="store_true",
                   help="save a figure per image of the first --plot_count images: input, ponder cost, masks")
    p.add_argument("--plot_only", action="store_true",
                   help="with -e --plot_ponder: only the figures (no evaluation of the whole set)")
    p.add_argument("--plot_dir", default=None, help="where ponder plots go (default <run dir>/ponder)")
    p.add_argument("--plot_count", type=int, default=8, help="number of images to plot")
    p.add_argument("--full_macs", action="store_true",
                   help="also print the fuller operation count (conv, BN, ReLU, linear, pooling)")
    p.add_argument("--fast", action="store_true",
                   help="with -e: also evaluate through the sparse inference engine (skips masked positions)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="sparse engine backend (auto: CUDA kernels via CuPy on GPUs, torch otherwise)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH",
                   help="initialise from these weights (gates keep their fresh initialisation)")
    p.add_argument("--workers", type=int, default=defaults["workers"], help="data loader processes")
    p.add_argument("--data", *data_aliases, dest="data", default=defaults["data"], help="dataset root")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, data order, noise)")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--log_dir", default=None, help="TensorBoard directory (default <run dir>/tb)")


def build_parser(description, models, defaults, data_aliases=(), epilog=None):
    """`defaults`: the script's model, data and workers. `data_aliases`: other names for --data (e.g. the
    reference's --dataset-root). `epilog`: examples shown by -h."""
    p = OneLineErrorParser(description=description, epilog=epilog)
    p.add_argument("--model", default=defaults["model"], choices=models, metavar="NAME",
                   help=f"network ({', '.join(models)}); with -r, the checkpoint's")
    p.add_argument("--budget", type=finite_float, default=-1,
                   help="fraction of conditional MACs to keep, in [0, 1]; -1 = the static network (no gates, a plain "
                        "ResNet); with -r, the checkpoint's")
    p.add_argument("--budget_targets", type=finite_float, nargs="+", default=None, metavar="BUDGET",
                   help="a multi-target model: one network with a gate (and block norms) per budget, each minibatch "
                        "training one in turn; with -r, the checkpoint's")
    p.add_argument("--model_kwargs", type=key_values(), nargs="*", action=KeyValues, default={}, metavar="KEY=VALUE",
                   help="options of the model's factory (e.g. drop_path_rate=0.1), as Python literals")
    _add_model_option_flags(p)
    _add_recipe_flags(p)
    _add_budget_aware_flags(p)
    _add_run_flags(p, defaults, data_aliases)
    _show_recipe_defaults(p, defaults["model"])
    return p


def _show_recipe_defaults(parser, model):
    """Appends to each recipe flag's help the value it takes for the script's default model."""
    from dynconv.models import model_config

    recipe = dict(RECIPE_DEFAULTS, **model_config(model).recipe)
    for action in parser._actions:
        if action.dest in recipe:
            value = recipe[action.dest]
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            action.help = f"{action.help or ''} (default: the model's recipe; {model}: {shown})".lstrip()
