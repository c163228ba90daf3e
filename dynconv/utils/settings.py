"""A run's settings: the command line, the checkpoint and the model's recipe reconciled once into a frozen object.

`reconcile(args, explicit, checkpoint, default_model) -> Settings` is the one place where a setting is decided:
flags the user left out come from the checkpoint (the architecture always; on resume the recipe too; the input
settings when evaluating or resuming), then from the model's recipe and RECIPE_DEFAULTS. Every value records
where it came from (`settings.source(name)`: default, command line, checkpoint, recipe or derived). The rest of
the run reads the Settings (attributes, as it read argparse's namespace) and cannot change them.
"""
import os
from collections.abc import Mapping

from dynconv.models import Decides, model_config
from .cli import RECIPE_DEFAULTS, model_options
from .errors import UserError

DEFAULT, COMMAND_LINE, CHECKPOINT, RECIPE, DERIVED = "default", "command line", "checkpoint", "recipe", "derived"
ARCHITECTURE = ("model", "budget", "budget_targets", "model_kwargs")  # what a checkpoint's weights fix
INPUT = ("resolution", "dataset", "classes", "data")  # what shapes the images a run reads (the entry's flags)


class Settings(Mapping):
    """Frozen: every flag's value (read as attributes or as a mapping) and its source."""

    def __init__(self, values, sources):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are frozen (set {name} in reconcile, or use replace())")

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def source(self, name):
        return self._sources[name]

    def replace(self, **changes):
        """A copy with `changes` (source: derived), e.g. for a tool that evaluates one budget of a run."""
        return Settings({**self._values, **changes}, {**self._sources, **dict.fromkeys(changes, DERIVED)})

    def __repr__(self):
        return f"Settings({self._values!r})"


class _Draft:
    """The settings while they are reconciled: reads like argparse's namespace; each change records its source."""

    def __init__(self, args, explicit):
        self.values = dict(vars(args))
        self.sources = {name: COMMAND_LINE if name in explicit else DEFAULT for name in self.values}

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name not in values:
            raise AttributeError(name)
        return values[name]

    def set(self, name, value, source):
        self.values[name] = value
        self.sources[name] = source


def reconcile(args, explicit, checkpoint, default_model):
    """The Settings of parsed flags `args` (`explicit`: the names given on the command line) with `checkpoint`
    (a loaded checkpoint or None) and the model's recipe; the lines it prints say what came from the checkpoint
    and which given flag overrides it."""
    draft = _Draft(args, explicit)
    _from_checkpoint(draft, checkpoint, explicit, default_model)
    recipe = model_config(draft.model).recipe
    _apply_recipe(draft, recipe)
    if not draft.evaluate:
        _fit_warmup(draft, recipe, explicit)
    return Settings(draft.values, draft.sources)


def decides(settings):
    """What the run's network decides per image, the one answer to "is this run dynamic": its family's kind
    (ModelConfig.gates), except Decides.NOTHING for a spatial family's network without a budget (`--budget -1`,
    the command line's spelling of the static network, and no --budget_targets)."""
    kind = model_config(settings.model).gates
    if kind is Decides.SPATIAL and settings.budget < 0 and not settings.budget_targets:
        return Decides.NOTHING
    return kind


def _from_checkpoint(draft, checkpoint, explicit, default_model):
    """Flags the user left out come from the checkpoint: the architecture always, and on resume the recipe too.
    A given architecture flag that contradicts the checkpoint is an error; a given recipe flag that differs from
    the checkpoint's on resume is an override, printed."""
    saved = (checkpoint or {}).get("args") or {}
    fallback = {"model": default_model, "budget": -1, "budget_targets": _checkpoint_budgets(checkpoint),
                "model_kwargs": {}}
    for name in ARCHITECTURE:
        if name not in explicit:
            draft.set(name, saved.get(name, fallback[name]), CHECKPOINT if name in saved else DEFAULT)
        elif name == "budget" and saved.get("budget_targets"):
            continue  # --budget picks one budget of a multi-target checkpoint (checked with the other flags)
        elif name in saved and getattr(draft, name) != saved[name]:
            raise UserError(f"--{name} {show(getattr(draft, name))} contradicts the checkpoint ({draft.resume} was "
                            f"trained with {name} {show(saved[name])}); leave the flag out to use the checkpoint's")
    _fold_model_options(draft, explicit, saved.get("model_kwargs", {}))
    # multi-target from pretrained weights: the per-budget norms share their affine parameters (the budget-aware
    # code's choice); recorded in the checkpoint, since the optimizer state depends on it
    if "tied_norms" in saved:
        if "tied_norms" in explicit and draft.tied_norms != saved["tied_norms"]:
            raise UserError(f"--{'' if draft.tied_norms else 'no-'}tied_norms contradicts the checkpoint (trained with "
                            f"tied_norms {saved['tied_norms']}); leave the flag out to use the checkpoint's")
        draft.set("tied_norms", saved["tied_norms"], CHECKPOINT)
    elif draft.tied_norms is None:
        draft.set("tied_norms", bool(draft.budget_targets) and bool(draft.pretrained), DERIVED)
    if checkpoint is not None:
        _input_from_checkpoint(draft, saved, explicit)
    if checkpoint is None or draft.evaluate:
        return
    for name in (*RECIPE_DEFAULTS, "limit_train_batches", "limit_val_batches"):  # a quick trial resumes as one
        if name not in explicit and name in saved:
            draft.set(name, saved[name], CHECKPOINT)
        elif name in explicit and name in saved and getattr(draft, name) != saved[name]:
            print(f"=> --{name} {show(getattr(draft, name))} overrides the checkpoint's {show(saved[name])}")


def _input_from_checkpoint(draft, saved, explicit):
    """Evaluating or resuming: the input settings the user left out come from the checkpoint (the data path only
    where the stored one exists here); one line lists what was taken where it differs from the flags' defaults,
    and one line per given flag that differs."""
    taken = []
    for name in INPUT:
        if name not in draft.values or name not in saved:
            continue
        value, stored = getattr(draft, name), saved[name]
        if name in explicit:
            if value != stored:
                print(f"=> --{name} {show(value)} overrides the checkpoint's {show(stored)}")
        elif name == "data" and not os.path.exists(str(stored)):
            print(f"=> the checkpoint's data path {stored} does not exist here: using --data {value}")
        elif value != stored:
            draft.set(name, stored, CHECKPOINT)
            taken.append(f"--{name} {show(stored)}" if stored is not None else f"no --{name}")
    if taken:
        print(f"=> from the checkpoint: {' '.join(taken)}")


def _fold_model_options(draft, explicit, saved_kwargs):
    """The model-option flags given (e.g. --heads) into model_kwargs, with the model's defaults for the rest, so
    that the checkpoint records the whole configuration. A flag the model does not have, or one that contradicts
    the checkpoint, is an error."""
    config = model_config(draft.model)
    options = config.options
    given = {name: getattr(draft, name) for name in model_options() if name in explicit}
    unknown = sorted(set(given) - set(options))
    if unknown:
        has = f"its options: {', '.join('--' + o for o in options)}" if options else "it has no model options"
        raise UserError(f"--{unknown[0]} does not apply to {draft.model} ({has})")
    kwargs = dict(draft.model_kwargs)
    for name, value in given.items():
        value, saved = (tuple(v) if isinstance(v, list) else v for v in (value, saved_kwargs.get(name)))
        if name in saved_kwargs and saved != value and name not in config.free_options:
            raise UserError(f"--{name} {show(value)} contradicts the checkpoint (trained with {name} "
                            f"{show(saved_kwargs[name])}); leave the flag out to use the checkpoint's")
        kwargs[name] = value
    source = COMMAND_LINE if given else draft.sources["model_kwargs"]
    draft.set("model_kwargs", {**{name: default for name, (default, _) in options.items()}, **kwargs}, source)
    if config.gates is not Decides.SPATIAL and (draft.budget >= 0 or draft.budget_targets):
        raise UserError(f"--budget and --budget_targets do not apply to {draft.model}: it has no spatial gates "
                        f"(its options: {', '.join('--' + o for o in options)})")


def _apply_recipe(draft, recipe):
    """Fills the recipe flags left unset from the model's `recipe`, then RECIPE_DEFAULTS (dicts copied, so that
    no run shares one); --gumbel_temp becomes a list (checkpoints before the schedules saved one number)."""
    for name, default in RECIPE_DEFAULTS.items():
        if getattr(draft, name) is None:
            draft.set(name, recipe.get(name, default), RECIPE if name in recipe else DEFAULT)
    for name in ("lr_scale", "freeze", "model_kwargs"):
        draft.values[name] = dict(getattr(draft, name))
    if not isinstance(draft.gumbel_temp, (list, tuple)):
        draft.values["gumbel_temp"] = [draft.gumbel_temp]


def _fit_warmup(draft, recipe, explicit):
    """A shorter run than the recipe's (e.g. a quick trial's --epochs 1) scales the recipe's warm-up with it (20 of
    ConvNeXt's 300 epochs would never end); said in one line. A --warmup_epochs given is kept as given."""
    warmup, planned = recipe.get("warmup_epochs", 0), recipe.get("epochs")
    if "warmup_epochs" in explicit or not warmup or not planned or draft.epochs >= planned:
        return
    draft.set("warmup_epochs", warmup * draft.epochs / planned, DERIVED)
    print(f"=> warm-up scaled with the run: the recipe's {warmup:g} of {planned} epochs is "
          f"{draft.warmup_epochs:.3g} of --epochs {draft.epochs}")


def _checkpoint_budgets(checkpoint):
    """The budgets of a budget-aware code's multi-target checkpoint (it has no args: each budget's best Prec@1
    is stored under the budget as a float key), or None."""
    budgets = sorted(k for k in (checkpoint or {}) if isinstance(k, float))
    return budgets or None


def show(value):
    """A setting as the command line spells it."""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value}"
