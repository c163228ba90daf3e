"""One training epoch and one evaluation pass; both return dicts of metrics. The run driver is utils/run.py."""
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from dynconv import MacCounter
from dynconv.objectives import Loss, StepOutput
from .distributed import all_reduce_sum
from .errors import UserError
from .recipe import clip_gradients, count_updates, set_lr, update_ema


class NonFinite(UserError):
    """The loss or the weights became NaN or infinite: training stops before anything of that state is saved."""


def _check_finite(nonfinite, values, epoch, step, lr):
    """Stops at the first optimizer update whose loss (of the minibatches it sums) was not finite, before the
    update: the weights and the checkpoints stay those of a finite state. One host sync per update."""
    if not nonfinite.item():
        return
    terms = [k for k, v in values.items() if not torch.isfinite(torch.as_tensor(v)).all()]
    raise NonFinite(f"the loss is not finite at epoch {epoch + 1}, batch {step} ({', '.join(terms) or 'total'}): "
                    f"stopped before the update, nothing of this state is saved; the learning rate (lr {lr:g}) is "
                    "likely too high, or a temperature or loss weight is extreme")


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.float16) if enabled else contextlib.nullcontext()


@dataclass
class TrainSetup:
    """What one epoch of training needs besides the model and the data (built by utils/run.py from the flags)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, stepped per update (utils/recipe.py)
    scaler: torch.amp.GradScaler
    loss: Loss
    ema: Any = None  # timm ModelEmaV3, updated after every optimizer update
    mixup: Optional[Callable] = None  # timm Mixup: (images, labels) -> (mixed images, soft labels)
    update_freq: int = 1  # minibatches per optimizer update (gradient accumulation)
    clip_grad: Optional[float] = None
    amp: bool = False
    freeze: dict = field(default_factory=dict)  # parameter group -> epochs at learning rate 0
    # which target (e.g. budget) minibatch i of the run trains; None for single-target models
    choose_target: Callable[[int], Any] = field(default=lambda i: None)
    awareness: Any = None  # multi-target: dynconv.objectives.BudgetAwareness, updated after every validation
    # called before every minibatch with the epochs done (fractional): per-iteration gate schedules
    before_step: Callable[[float], None] = field(default=lambda epochs_done: None)
    # called after every optimizer update with (epoch, batches done in it): mid-epoch checkpoints, stopping
    after_update: Callable[[int, int], None] = field(default=lambda epoch, step: None)



def _mix(setup, images, labels):
    """Mixup/cutmix where enabled. timm mixes pairs within the batch, so an odd (last) batch keeps its images
    and gets the same smoothed soft targets unmixed."""
    if setup.mixup is None:
        return images, labels
    if images.shape[0] % 2:
        from timm.data.mixup import mixup_target  # on use: timm takes seconds to import

        return images, mixup_target(labels, setup.mixup.num_classes, 1.0, setup.mixup.label_smoothing)
    return setup.mixup(images, labels)


def _optimizer_update(model, setup):
    """One optimizer update: clipping, the step, the EMA (of the model itself, not its DDP wrapper)."""
    setup.scaler.unscale_(setup.optimizer)
    clip_gradients(model.parameters(), setup.clip_grad)
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    setup.optimizer.zero_grad(set_to_none=True)
    update_ema(setup.ema, getattr(model, "module", model))


class _Sums:
    """Per-sample sums of step metrics, on the device (no host synchronisation per step); each metric is averaged
    over the samples of the steps that reported it (e.g. one budget's)."""

    def __init__(self):
        self.sums, self.seen = {}, {}

    def add(self, values, n):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + torch.as_tensor(v).detach() * n
            self.seen[k] = self.seen.get(k, 0) + n

    def means(self):
        out = {}
        for k, v in self.sums.items():
            v = v / max(self.seen[k], 1)
            out[k] = v.item() if v.dim() == 0 else v.tolist()
        return out


class _Progress:
    """The epoch's progress: a tqdm bar with the running loss and cost fraction on a terminal; when the output is
    redirected (nohup, Slurm, log files), a plain line every `seconds` instead."""

    def __init__(self, loader, epoch, start, show, seconds=30.0):
        self.terminal = sys.stdout.isatty()
        self.show, self.seconds, self.epoch = show, seconds, epoch
        # the loader of a resumed epoch holds only the batches after `start`
        self.total, self.last = start + len(loader), time.monotonic()
        self.bar = tqdm(total=self.total, initial=start, desc=f"epoch {epoch + 1}", leave=False,
                        disable=not (show and self.terminal))

    def step(self, i, values):
        self.bar.update(1)
        if not self.show or (i + 1) % 10 and i + 1 != self.total:
            return  # reading the values syncs the device: every 10 steps is enough
        shown = {k: f"{values[k].item():.4g}" for k in ("task_loss", "cost") if k in values}
        if self.terminal:
            self.bar.set_postfix(shown, refresh=False)
        elif time.monotonic() - self.last >= self.seconds or i + 1 == self.total:
            self.last = time.monotonic()
            print(f"epoch {self.epoch + 1}: {i + 1}/{self.total} batches, "
                  + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def close(self):
        self.bar.close()


def _gradient_sync(model, updating):
    """Under DDP, gradients are all-reduced only on the minibatch that ends an accumulation (--update_freq)."""
    if updating or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def train_one_epoch(model, loader, setup, epoch, ctx, show_progress=True, start_step=0):
    """One pass over `loader` (from batch `start_step` when resuming mid-epoch; the loader's sampler skips the
    batches before it): every loss term's mean, the cost fractions the terms report, Prec@1 and lr."""
    model.train()
    device, batches = ctx.device, len(loader) + start_step
    per_epoch = count_updates(batches, setup.update_freq)
    sums = _Sums()
    set_lr(setup.scheduler, epoch, start_step // setup.update_freq, per_epoch, setup.freeze)
    lr = max(group["lr"] for group in setup.optimizer.param_groups)
    progress = _Progress(loader, epoch, start_step, show_progress)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for i, (images, labels) in enumerate(loader, start=start_step):
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        hard_labels = labels
        images, labels = _mix(setup, images, labels)
        target = setup.choose_target(epoch * batches + i)
        setup.before_step(epoch + i / batches)
        with autocast(device, setup.amp):
            logits, decisions = model(images, target=target)
            total, values = setup.loss(StepOutput(images, logits, decisions, labels, epoch + i / batches, target))
        updating = (i + 1) % setup.update_freq == 0 or i + 1 == batches
        nonfinite |= ~torch.isfinite(total.detach())
        with _gradient_sync(model, updating):
            setup.scaler.scale(total / setup.update_freq).backward()
        values["train_prec1"] = 100.0 * (logits.detach().argmax(1) == hard_labels).float().mean()
        if target is not None:  # a multi-target model: the step's metrics per budget too, as '<name>@<budget>'
            values.update({f"{k}@{target:g}": v for k, v in list(values.items())})
        sums.add(values, images.shape[0])
        progress.step(i, values)
        if updating:
            _check_finite(nonfinite, values, epoch, i + 1, max(g["lr"] for g in setup.optimizer.param_groups))
            set_lr(setup.scheduler, epoch, i // setup.update_freq, per_epoch, setup.freeze)
            _optimizer_update(model, setup)
            if i + 1 < batches:
                setup.after_update(epoch, i + 1)
    progress.close()
    return {**sums.means(), "lr": lr}


def _accumulate_topk(logits, labels, topk, correct):
    top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    for i, k in enumerate(topk):
        correct[i] += hits[:, :k].any(1).sum()


@torch.no_grad()
def validate(model, loader, ctx, topk=(1,), full_macs=False, amp=False, show_progress=True, forward=None,
             timed=False, target=None):
    """Prec@k (percent) and MMac per image over the whole validation set (summed over all processes).
    `forward` (default: the model) runs the images, e.g. the sparse engine; the MAC count needs the model's own
    forward and is skipped otherwise. `timed` adds images/s of the forward passes (a device sync per batch).
    `target` selects the operating point of multi-target models."""
    model.eval()
    device = ctx.device
    correct = torch.zeros(len(topk), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    counters = []
    if forward is None:
        forward = model
        counters = [MacCounter(model)] + ([MacCounter(model, full=True)] if full_macs else [])
    seconds = 0.0
    with contextlib.ExitStack() as stack:
        for counter in counters:
            stack.enter_context(counter)
        for images, labels in tqdm(loader, desc="eval", leave=False, disable=None if show_progress else True):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            start = time.perf_counter()
            with autocast(device, amp):
                logits, _ = forward(images, target=target)
            if timed:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - start
            _accumulate_topk(logits, labels, topk, correct)
            count += images.shape[0]
    return _reduce_metrics(correct, count, counters, topk, ctx, seconds if timed else None)


def validate_targets(model, loader, ctx, targets, topk=(1,), **kwargs):
    """validate() for each target of a multi-target model, under 'targets', and their mean (Prec@k, MMac, speed)
    as the metrics themselves; for a single-target model (no targets) validate() as it is."""
    if not targets:
        return validate(model, loader, ctx, topk, **kwargs)
    return mean_over_targets({t: validate(model, loader, ctx, topk, target=t, **kwargs) for t in targets})


def mean_over_targets(per_target):
    """{target: metrics} -> the mean of every number over the targets, with the per-target metrics under
    'targets'."""
    first = next(iter(per_target.values()))
    numbers = [k for k, v in first.items() if isinstance(v, (int, float))]
    return {**first, **{k: sum(m[k] for m in per_target.values()) / len(per_target) for k in numbers},
            "targets": per_target}


def target_scalars(metrics):
    """A multi-target evaluation's per-budget metrics as flat '<name>@<budget>' scalars (for the logs)."""
    return {f"{k}@{t:g}": v for t, m in metrics.get("targets", {}).items() for k, v in m.items()}


def _reduce_metrics(correct, count, counters, topk, ctx, seconds):
    device = correct.device
    totals = torch.cat([correct, count[None]] + [
        torch.tensor([float(c.macs), float(c.images)], device=device, dtype=torch.float64) for c in counters])
    totals = all_reduce_sum(totals, ctx).tolist()
    n = max(totals[len(topk)], 1)
    metrics = {f"prec{k}": 100 * totals[i] / n for i, k in enumerate(topk)}
    if seconds is not None:
        metrics["images_per_s"] = count.item() / max(seconds, 1e-9)  # this process's own compute
    for name, i in zip(("mmac", "mmac_full"), range(len(counters))):
        macs, images = totals[len(topk) + 1 + 2 * i: len(topk) + 3 + 2 * i]
        metrics[name] = macs / max(images, 1) / 1e6
    return metrics


def print_eval(epoch, metrics, prefix=""):
    """The lines users grep for (the reference's exact form); `prefix` e.g. '[budget 0.3] ' (multi-target)."""
    print(f"{prefix}* Epoch {epoch} - Prec@1 {metrics['prec1']:.3f}")
    if "prec5" in metrics:
        print(f"{prefix}* Epoch {epoch} - Prec@5 {metrics['prec5']:.3f}")
    print(f"{prefix}* FLOPS (multiply-accumulates, MACs) per image:  {metrics['mmac']:.6f} MMac")
    if "mmac_full" in metrics:
        print(f"{prefix}* Full operation count (conv, BN, ReLU, linear, pooling) per image:  "
              f"{metrics['mmac_full']:.6f} MMac")
    if "reference_images_per_s" in metrics:
        ratio = metrics["images_per_s"] / max(metrics["reference_images_per_s"], 1e-9)
        print(f"{prefix}* Images/s: masked-dense {metrics['reference_images_per_s']:.1f}, sparse engine "
              f"({metrics['backend']}) {metrics['images_per_s']:.1f} ({ratio:.2f}x)")
        gap = abs(metrics["reference_prec1"] - metrics["prec1"])
        if gap > 1e-9:
            # the two paths round differently (another summation order), and a decision is a threshold: a mask
            # logit within rounding of 0, or a DGC saliency within rounding of the last kept one's, goes either way
            images = round(gap / 100 * metrics.get("evaluated_images", 0))
            print(f"{prefix}* warning: masked-dense Prec@1 {metrics['reference_prec1']:.3f} differs from the "
                  f"engine's by {images} images net: decisions within float rounding of their threshold (a mask "
                  "logit near 0, a saliency tied with the last kept channel's) can go either way on the two paths")
