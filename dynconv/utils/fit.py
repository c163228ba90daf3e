"""Training a model from the flags: the TrainSetup (timm optimizer, schedule, EMA, mixup, loss terms), the epoch
loop with evaluation, checkpoints at the end of every epoch and mid-epoch (on SIGINT/SIGTERM, or every N steps or
minutes), and resuming from any of them exactly where the run stopped."""
import os

import torch
from tqdm import tqdm

from dynconv import set_gate_schedule
from dynconv.gates import gate_state_keys
from dynconv.models import Decides
from dynconv.objectives import BudgetAwareness, DecisionLosses, Distillation, Loss, Sparsity, TaskLoss
from . import recipe
from .budgets import awareness_setup, run_targets
from .checkpoint import BEST, BEST_EMA, EMA, LATEST, non_finite_keys, restore_rng, rng_state, save_checkpoint
from .distributed import broadcast_buffers
from .errors import UserError
from .interrupt import Interrupted, SavePolicy, StopRequest
from .logger import RunLogger
from .settings import decides
from .training import NonFinite, TrainSetup, target_scalars, train_one_epoch, validate_targets

PARAMETER_GROUPS = ("gates", "backbone")  # the gates' parameters, and everything else


def build_setup(model, args, num_classes, updates_per_epoch, ctx, teacher=None):
    """Optimizer (parameter groups gates/backbone), per-iteration schedule, EMA, mixup and the loss terms (with
    distillation from `teacher` when given); multi-target runs train one budget per minibatch, round-robin, each
    step's loss weighted by the budget awareness."""
    gates = gate_state_keys(model)
    groups = recipe.param_groups(model, args.weight_decay, args.lr_scale,
                                 group_of=lambda name: PARAMETER_GROUPS[name not in gates],
                                 no_weight_decay_norm_bias=args.no_wd_norm_bias)
    optimizer = recipe.create_optimizer(groups, args.opt, args.lr, args.weight_decay, args.momentum)
    scheduler = recipe.create_scheduler(optimizer, args.sched, args.epochs, updates_per_epoch, args.lr_decay,
                                        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                        min_lr=args.min_lr)
    mixup = recipe.create_mixup(args.mixup, args.cutmix, args.smoothing, num_classes)
    targets = run_targets(args)
    terms = [TaskLoss(args.smoothing), DecisionLosses()]  # with mixup the soft targets carry the smoothing
    if decides(args) is Decides.SPATIAL:  # multi-target: each step's own budget
        terms.append(Sparsity(None if targets else args.budget, args.epochs, args.sparsity_weight))
    if teacher is not None:
        terms.append(Distillation(teacher, args.T_kd, args.kd_weight))
    awareness = BudgetAwareness(targets, *awareness_setup(args, args.model)) if targets else None
    return TrainSetup(optimizer, scheduler, torch.amp.GradScaler(ctx.device.type, enabled=args.amp),
                      Loss(terms, weight=awareness),
                      ema=recipe.create_ema(model, args.model_ema_decay) if args.model_ema else None,
                      mixup=mixup, update_freq=args.update_freq, clip_grad=args.clip_grad, amp=args.amp,
                      freeze=args.freeze, awareness=awareness, before_step=gate_schedule(model, args),
                      **({"choose_target": lambda i: targets[i % len(targets)]} if targets else {}))


def gate_schedule(model, args):
    """Before every minibatch: the gates' schedule state at `epochs_done` (fractional), i.e. Gumbel noise and
    temperature of the epoch, and the training progress (iterations done / total, e.g. DGC's pruning)."""
    def schedule(epochs_done):
        epoch = int(epochs_done)
        set_gate_schedule(model, noise=gumbel_noise_on(epoch, args), temperature=gumbel_temperature(epoch, args),
                          progress=epochs_done / args.epochs)
    return schedule


def gumbel_noise_on(epoch, args):
    """The reference's rule: noise while not (epoch > fraction * epochs), epoch 0-based (30 epochs: off from 25)."""
    return not epoch > args.gumbel_noise_epochs * args.epochs


def gumbel_temperature(epoch, args):
    """The temperature of `epoch`: --gumbel_temp values, the next one from each --gumbel_temp_epochs fraction on
    (the budget-aware ConvNeXt recipe: 5.0, 2.5 from 30% of the epochs, 1.0 from 60%)."""
    passed = sum(epoch >= fraction * args.epochs for fraction in args.gumbel_temp_epochs)
    return args.gumbel_temp[min(passed, len(args.gumbel_temp) - 1)]


class Trainer:
    """The epoch loop of one run: the state it resumes from and saves (epoch, step, best Prec@1s) and its files."""

    def __init__(self, model, setup, args, run_dir, ctx):
        self.model, self.setup, self.args, self.run_dir, self.ctx = model, setup, args, run_dir, ctx
        self.epoch, self.step, self.best, self.best_ema = 0, 0, 0.0, 0.0
        self.saved = None  # what the last checkpoint written by this run holds, for the messages
        self.stop = StopRequest()
        self.policy = SavePolicy(args.save_every_steps, args.save_every_minutes)
        setup.after_update = self.after_update

    def resume(self, checkpoint, path):
        """Optimizer, EMA and random-generator states; the epoch and, for a mid-epoch checkpoint, the step."""
        try:
            self.setup.optimizer.load_state_dict(checkpoint["optimizer"])
            recipe.restore_ema(self.setup.ema, checkpoint)
        except (KeyError, ValueError) as e:
            raise UserError(f"{path} cannot resume training: optimizer state missing or incompatible "
                            f"({type(e).__name__}: {e})")
        self.epoch, self.step = int(checkpoint.get("epoch", 0)), int(checkpoint.get("step", 0))
        self.best = float(checkpoint.get("best_prec1", 0.0))
        self.best_ema = float(checkpoint.get("best_ema_prec1", 0.0))
        if self.setup.awareness is not None and "awareness_weights" in checkpoint:
            self.setup.awareness.weights = {float(b): w for b, w in checkpoint["awareness_weights"].items()}
        if "rng" in checkpoint and not self.ctx.distributed:  # under torchrun each process keeps its own seed
            restore_rng(checkpoint["rng"])

    def _state(self, **extra):
        state = {"state_dict": self.model.state_dict(), "optimizer": self.setup.optimizer.state_dict(),
                 "best_prec1": self.best, "args": dict(self.args), "version": 2, "rng": rng_state(), **extra}
        if self.setup.awareness is not None:
            state["awareness_weights"] = {f"{b:g}": w for b, w in self.setup.awareness.weights.items()}
        if self.setup.ema is not None:
            state.update({recipe.EMA_KEY: recipe.ema_state(self.setup.ema), "best_ema_prec1": self.best_ema})
        return state

    def _write(self, state, name):
        os.makedirs(self.run_dir, exist_ok=True)
        save_checkpoint(state, os.path.join(self.run_dir, name))

    def after_update(self, epoch, step):
        """After an optimizer update inside an epoch: a mid-epoch checkpoint when due or asked to stop."""
        stop = self.stop.requested(self.ctx)
        if not (stop or self.policy.due()):
            return
        if self.ctx.is_main:
            self._write(self._state(epoch=epoch, step=step), LATEST)
        self.saved = f"{os.path.join(self.run_dir, LATEST)} (epoch {epoch + 1}, after batch {step})"
        self.policy.saved()
        if stop:
            raise Interrupted(f"interrupted: saved {self.saved}; resume with the same command and "
                              f"-r {self.run_dir}", self.stop.exit_code)

    def save_epoch(self, epoch, metrics, ema_metrics):
        """checkpoint.pth (resumable), checkpoint_best.pth, and the EMA's own pair (its weights as state_dict).
        Weights holding NaN or infinity are never saved: the run stops with one line."""
        bad = non_finite_keys(self.model.state_dict())
        if bad:
            raise NonFinite(f"the weights hold NaN or infinity after epoch {epoch + 1} ({', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''}): nothing of this epoch is saved; the learning rate "
                            f"(--lr {self.args.lr:g}) is likely too high")
        state = self._state(epoch=epoch + 1, prec1=metrics["prec1"], mmac=metrics["mmac"],
                            **_per_budget(metrics))
        self._write(state, LATEST)
        if metrics["prec1"] >= self.best:
            self._write(state, BEST)
        if self.setup.ema is not None:
            common = {"epoch": epoch + 1, "args": state["args"], "version": 2, "ema": True}
            ema_state = {"state_dict": state[recipe.EMA_KEY], "prec1": ema_metrics["prec1"],
                         "mmac": ema_metrics["mmac"], "best_prec1": self.best_ema, **_per_budget(ema_metrics),
                         **common}
            self._write(ema_state, EMA)
            if ema_metrics["prec1"] >= self.best_ema:
                self._write(ema_state, BEST_EMA)
        self.saved = f"{os.path.join(self.run_dir, LATEST)} (end of epoch {epoch + 1})"


def _per_budget(metrics):
    """A multi-target epoch's Prec@1 and MMac per budget, for the checkpoint (the mean is its prec1/mmac)."""
    targets = metrics.get("targets", {})
    return {"budget_metrics": {f"{t:g}": {"prec1": m["prec1"], "mmac": m["mmac"]} for t, m in targets.items()}} \
        if targets else {}


def fit(model, data, checkpoint, args, topk, run_dir, ctx, teacher=None):
    """Trains from the checkpoint's epoch (and step) to --epochs; evaluates (and the EMA) and saves after every
    epoch. Returns the last epoch's metrics with the best Prec@1 (multi-target: the mean over the budgets)."""
    train_loader, val_loader, val_set, num_classes = data
    setup = build_setup(model, args, num_classes, recipe.count_updates(len(train_loader), args.update_freq), ctx,
                        teacher)
    trainer = Trainer(model, setup, args, run_dir, ctx)
    if checkpoint is not None:
        trainer.resume(checkpoint, args.resume)
    with trainer.stop:
        try:
            train_model = _distributed(model, args, ctx)
        except RuntimeError:  # the group's signal came while the processes connected: torchrun closed the store
            if trainer.stop.signal is None:
                raise
            raise Interrupted(_interrupted_line(trainer), trainer.stop.exit_code) from None
        if ctx.is_main:  # after the set-up: from here on a signal is answered with a resumable checkpoint
            print(f"=> training epochs {trainer.epoch + 1}-{args.epochs}" +
                  (f" (resuming epoch {trainer.epoch + 1} after batch {trainer.step})" if trainer.step else ""))
            if setup.awareness is not None:
                aware = setup.awareness
                print(f"=> budget awareness: {aware.metric}" + (
                    " against Prec@1 targets " + ", ".join(f"{b:g}: {t:g}" for b, t in aware.targets.items())
                    if aware.targets else ""))
        try:
            metrics = _epochs(trainer, train_model, train_loader, val_loader, topk)
        except KeyboardInterrupt as e:  # a second signal
            raise Interrupted(_interrupted_line(trainer), getattr(e, "code", 130))
    if ctx.is_main:
        print(f"=> done: best Prec@1 {trainer.best:.3f}; checkpoints in {run_dir}")
    return {**metrics, "best_prec1": trainer.best,
            **({"best_ema_prec1": trainer.best_ema} if setup.ema is not None else {})}


def _interrupted_line(trainer):
    return "interrupted: " + (f"the last checkpoint is {trainer.saved}" if trainer.saved else
                              "no checkpoint was saved by this run")


def _distributed(model, args, ctx):
    """The model to train: under torchrun wrapped in DistributedDataParallel (which connects the processes)."""
    if not ctx.distributed:
        return model
    # multi-target: a step trains one budget, so the other budgets' gates and norms get no gradient
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=bool(run_targets(args)))


def _epochs(trainer, train_model, train_loader, val_loader, topk):
    model, setup, args, ctx = trainer.model, trainer.setup, trainer.args, trainer.ctx
    logger = RunLogger(args.log_dir or os.path.join(trainer.run_dir, "tb"),
                       os.path.join(trainer.run_dir, "log.jsonl"), ctx.is_main)
    metrics = {}
    for epoch in tqdm(range(trainer.epoch, args.epochs), desc="training", initial=trainer.epoch,
                      total=args.epochs, disable=None if ctx.is_main else True):
        start_step = trainer.step if epoch == trainer.epoch else 0
        train_loader.sampler.begin(epoch, start_step * args.batchsize)
        train_metrics = train_one_epoch(train_model, train_loader, setup, epoch, ctx, ctx.is_main, start_step)
        broadcast_buffers(model, ctx)  # the checkpoint holds rank 0's BN statistics: evaluate exactly that
        targets = run_targets(args)
        metrics = validate_targets(model, val_loader, ctx, targets, topk, amp=args.amp, show_progress=ctx.is_main)
        trainer.best = max(trainer.best, metrics["prec1"])
        ema_metrics = {} if setup.ema is None else validate_targets(setup.ema.module, val_loader, ctx, targets, topk,
                                                                     amp=args.amp, show_progress=ctx.is_main)
        trainer.best_ema = max(trainer.best_ema, ema_metrics.get("prec1", 0.0))
        if setup.awareness is not None:  # the next epoch's weights, from the EMA's accuracy when there is one
            setup.awareness.update({t: m["prec1"] for t, m in (ema_metrics or metrics)["targets"].items()})
        if ctx.is_main:
            _report_epoch(epoch, train_metrics, metrics, ema_metrics, setup.awareness)
            trainer.save_epoch(epoch, metrics, ema_metrics)
            _log_epoch(epoch, train_metrics, metrics, ema_metrics, trainer.best, logger, setup.awareness)  # once saved
        if trainer.stop.requested(ctx):
            raise Interrupted(f"interrupted: saved {trainer.saved}; resume with the same command and "
                              f"-r {trainer.run_dir}", trainer.stop.exit_code)
    logger.close()
    return metrics


def _report_epoch(epoch, train_metrics, metrics, ema_metrics, awareness=None):
    """The epoch's line (multi-target: the mean over the budgets, after a line per budget)."""
    for target, budget_metrics in metrics.get("targets", {}).items():
        ema = f", EMA Prec@1 {ema_metrics['targets'][target]['prec1']:.3f}" if ema_metrics else ""
        tqdm.write(f"[budget {target:g}] * Epoch {epoch + 1} - Prec@1 {budget_metrics['prec1']:.3f}  (MMac "
                   f"{budget_metrics['mmac']:.3f}{ema}, next loss weight {awareness.weights[target]:.3f})")
    ema = f", EMA Prec@1 {ema_metrics['prec1']:.3f}" if ema_metrics else ""
    mean = " (mean over the budgets)" if "targets" in metrics else ""
    tqdm.write(f"* Epoch {epoch + 1} - Prec@1 {metrics['prec1']:.3f}{mean}  (task loss "
               f"{train_metrics['task_loss']:.4f}, MMac {metrics['mmac']:.3f}, lr {train_metrics['lr']:g}{ema})")


def _log_epoch(epoch, train_metrics, metrics, ema_metrics, best, logger, awareness=None):
    """The epoch's logs, written after its checkpoint: a resumed run never logs an epoch twice."""
    weights = {f"loss_weight@{t:g}": w for t, w in awareness.weights.items()} if awareness is not None else {}
    logger.log(epoch + 1, {**train_metrics, **weights}, "train")
    for kind, values in (("val", {**metrics, "best_prec1": best}), ("val_ema", ema_metrics)):
        if values:
            logger.log(epoch + 1, {**{k: v for k, v in values.items() if k != "targets"}, **target_scalars(values)},
                       kind)
