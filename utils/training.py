"""Training and evaluation shared by every entry script: train_one_epoch, validate, and the run driver."""
import contextlib
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynconv import MacCounter, SparsityCriterion, set_gumbel
from dynconv.flops import count_parameters
from models import create_model
from .checkpoint import BEST, LATEST, load_checkpoint, load_model_state, resolve_checkpoint, save_checkpoint
from .data import build_loaders, first_images
from .distributed import all_reduce_sum, broadcast_buffers, init_distributed, shutdown
from .errors import UserError
from .logger import RunLogger


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.float16) if enabled else contextlib.nullcontext()


def train_one_epoch(model, loader, optimizer, scaler, sparsity, epoch, ctx, amp=False, show_progress=True):
    """One pass over `loader`. Returns the epoch's mean task loss, sparsity loss, cost fractions, Prec@1.

    Metrics stay on the device until the end of the epoch (no host synchronisation per step)."""
    model.train()
    device = ctx.device
    sums = {"task_loss": torch.zeros((), device=device), "sparsity_loss": torch.zeros((), device=device),
            "cost": torch.zeros((), device=device), "correct": torch.zeros((), device=device)}
    block_cost, seen = None, 0
    for images, target in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None if show_progress else True):
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits, masks = model(images)
            task_loss = F.cross_entropy(logits, target)
            loss = task_loss
            if sparsity is not None:
                sparsity_loss, cost, block_costs = sparsity(masks, epoch)
                loss = loss + sparsity_loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        n = images.shape[0]
        seen += n
        sums["task_loss"] += task_loss.detach() * n
        sums["correct"] += (logits.detach().argmax(1) == target).sum()
        if sparsity is not None:
            sums["sparsity_loss"] += sparsity_loss.detach() * n
            sums["cost"] += cost * n
            block_cost = block_costs * n if block_cost is None else block_cost + block_costs * n
    metrics = {k: v.item() / max(seen, 1) for k, v in sums.items()}
    metrics["train_prec1"] = 100 * metrics.pop("correct")
    if block_cost is not None:
        metrics["block_cost"] = (block_cost / seen).tolist()
    else:
        del metrics["sparsity_loss"], metrics["cost"]
    return metrics


@torch.no_grad()
def validate(model, loader, ctx, topk=(1,), full_macs=False, amp=False, show_progress=True, forward=None,
             timed=False):
    """Prec@k (percent) and MMac per image over the whole validation set (summed over all processes).
    `forward` (default: the model) runs the images, e.g. the sparse engine; the MAC count needs the model's own
    forward and is skipped otherwise. `timed` adds images/s of the forward passes (a device sync per batch)."""
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
        for images, target in tqdm(loader, desc="eval", leave=False, disable=None if show_progress else True):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            target = target.to(device, non_blocking=True)
            start = time.perf_counter()
            with autocast(device, amp):
                logits, _ = forward(images)
            if timed:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - start
            top = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
            hits = top == target[:, None]
            for i, k in enumerate(topk):
                correct[i] += hits[:, :k].any(1).sum()
            count += images.shape[0]
    totals = torch.cat([correct, count[None]] + [
        torch.tensor([float(c.macs), float(c.images)], device=device, dtype=torch.float64) for c in counters])
    totals = all_reduce_sum(totals, ctx).tolist()
    n = max(totals[len(topk)], 1)
    metrics = {f"prec{k}": 100 * totals[i] / n for i, k in enumerate(topk)}
    if timed:
        metrics["images_per_s"] = count.item() / max(seconds, 1e-9)  # this process's own compute
    if counters:
        metrics["mmac"] = totals[len(topk) + 1] / max(totals[len(topk) + 2], 1) / 1e6
    if full_macs:
        metrics["mmac_full"] = totals[len(topk) + 3] / max(totals[len(topk) + 4], 1) / 1e6
    return metrics


def evaluate_fast(model, loader, ctx, topk, args, show):
    """-e --fast: the masked-dense pass (Prec@k, MMac, speed), then the sparse engine (Prec@k, speed).
    Prints the engine's accuracy; the two must agree (the engine computes the same function)."""
    from dynconv.sparse.engine import SparseEngine

    reference = validate(model, loader, ctx, topk, args.full_macs, args.amp, show, timed=True)
    try:
        engine = SparseEngine(model, backend=args.backend)
    except ValueError as e:
        raise UserError(str(e))
    fast = validate(model, loader, ctx, topk, amp=args.amp, show_progress=show, forward=engine, timed=True)
    return {**reference, **{k: fast[k] for k in fast if k.startswith("prec")},
            "reference_prec1": reference["prec1"], "reference_images_per_s": reference["images_per_s"],
            "images_per_s": fast["images_per_s"], "backend": engine.backend}


def print_eval(epoch, metrics):
    """The lines users grep for (the reference's exact form)."""
    print(f"* Epoch {epoch} - Prec@1 {metrics['prec1']:.3f}")
    if "prec5" in metrics:
        print(f"* Epoch {epoch} - Prec@5 {metrics['prec5']:.3f}")
    print(f"* FLOPS (multiply-accumulates, MACs) per image:  {metrics['mmac']:.6f} MMac")
    if "mmac_full" in metrics:
        print(f"* Full operation count (conv, BN, ReLU, linear, pooling) per image:  {metrics['mmac_full']:.6f} MMac")
    if "reference_images_per_s" in metrics:
        ratio = metrics["images_per_s"] / max(metrics["reference_images_per_s"], 1e-9)
        print(f"* Images/s: masked-dense {metrics['reference_images_per_s']:.1f}, sparse engine "
              f"({metrics['backend']}) {metrics['images_per_s']:.1f} ({ratio:.2f}x)")
        if abs(metrics["reference_prec1"] - metrics["prec1"]) > 1e-9:
            print(f"* warning: masked-dense Prec@1 {metrics['reference_prec1']:.3f} differs from the engine's "
                  "(a mask logit within float rounding of 0?)")


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


def run(args, family, make_datasets, topk=(1,), load_pretrained=None):
    """The whole CLI run: build, resume, then evaluate or train. `make_datasets(args) -> (train, val, classes)`;
    `load_pretrained(model, args)` implements --pretrained for the family."""
    if not (args.budget == -1 or 0 <= args.budget <= 1):
        raise UserError(f"--budget must be in [0, 1], or -1 for the plain ResNet (got {args.budget:g})")
    if args.epochs < 1 or args.batchsize < 1:
        raise UserError("--epochs and --batchsize must be positive")
    if args.fast and not args.evaluate:
        raise UserError("--fast is an evaluation mode: use it with -e")
    if args.amp and not args.device.startswith("cuda"):
        raise UserError("--amp needs a CUDA device")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} requested but CUDA is not available here; use --device cpu")
    checkpoint_path = _find_checkpoint(args)
    run_dir = args.save_dir or (os.path.dirname(checkpoint_path) if args.evaluate else
                                default_run_dir(family, args.model, args.budget))

    ctx = init_distributed(args.device)
    try:
        _run(args, family, make_datasets, topk, load_pretrained, checkpoint_path, run_dir, ctx)
    finally:
        shutdown(ctx)


def _run(args, family, make_datasets, topk, load_pretrained, checkpoint_path, run_dir, ctx):
    torch.manual_seed(args.seed + ctx.rank)
    torch.set_flush_denormal(True)  # denormal gradients slow CPU arithmetic many times over
    random.seed(args.seed + ctx.rank)
    show = ctx.is_main
    if ctx.is_main and not args.evaluate:
        _check_writable(run_dir)

    train_set, val_set, num_classes = make_datasets(args)
    sparse = args.budget >= 0
    # channels-last: about 1.3x faster training on CPU (oneDNN) and the layout tensor cores want on GPUs
    model = create_model(args.model, family, sparse=sparse, num_classes=num_classes)
    model = model.to(ctx.device, memory_format=torch.channels_last)
    if load_pretrained is not None and args.pretrained:
        load_pretrained(model, args)

    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        load_model_state(model, checkpoint["state_dict"], checkpoint_path)
    if ctx.is_main:
        print(f"=> {args.model} ({'DynConv, budget %g' % args.budget if sparse else 'dense'}), "
              f"{count_parameters(model):,} parameters" + (f", from {checkpoint_path}" if checkpoint else ""))

    train_loader, val_loader, train_sampler = build_loaders(train_set, val_set, args.batchsize, args.workers, ctx)
    if args.evaluate:
        if args.fast:
            metrics = evaluate_fast(model, val_loader, ctx, topk, args, show)
        else:
            metrics = validate(model, val_loader, ctx, topk, args.full_macs, args.amp, show)
        if ctx.is_main:
            print_eval(checkpoint.get("epoch", 0), metrics)
            if args.plot_ponder:
                plot_ponder(model, val_set, args, run_dir, ctx)
        return

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_decay, gamma=0.1)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp)
    start_epoch, best_prec1 = 0, 0.0
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if "scheduler" in checkpoint:
                scheduler.load_state_dict(checkpoint["scheduler"])
            else:  # reference checkpoints: rebuild the schedule from the epoch
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_decay, 0.1,
                                                                 last_epoch=checkpoint["epoch"] - 1)
        except (KeyError, ValueError) as e:
            raise UserError(f"{checkpoint_path} cannot resume training: optimizer state missing or "
                            f"incompatible ({type(e).__name__}: {e})")
        start_epoch = int(checkpoint.get("epoch", 0))
        best_prec1 = float(checkpoint.get("best_prec1", 0.0))
        if ctx.is_main:
            print(f"=> resuming at epoch {start_epoch + 1}, lr {optimizer.param_groups[0]['lr']:g}")

    train_model = model
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    sparsity = SparsityCriterion(args.budget, args.epochs, args.sparsity_weight) if sparse else None
    logger = RunLogger(args.log_dir or os.path.join(run_dir, "tb"), os.path.join(run_dir, "log.jsonl"), ctx.is_main)
    epochs = tqdm(range(start_epoch, args.epochs), desc="training", initial=start_epoch, total=args.epochs,
                  disable=None if show else True)
    for epoch in epochs:
        set_gumbel(model, noise=epoch < args.gumbel_noise_epochs * args.epochs, temperature=args.gumbel_temp)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(train_model, train_loader, optimizer, scaler, sparsity, epoch, ctx,
                                        args.amp, show)
        scheduler.step()
        broadcast_buffers(model, ctx)  # the checkpoint holds rank 0's BN statistics: evaluate exactly that
        val_metrics = validate(model, val_loader, ctx, topk, False, args.amp, show)
        best_prec1 = max(best_prec1, val_metrics["prec1"])
        if ctx.is_main:
            tqdm.write(f"* Epoch {epoch + 1} - Prec@1 {val_metrics['prec1']:.3f}  "
                       f"(task loss {train_metrics['task_loss']:.4f}, MMac {val_metrics['mmac']:.3f}, lr {lr:g})")
            logger.log(epoch + 1, {"lr": lr, **train_metrics}, "train")
            logger.log(epoch + 1, {**val_metrics, "best_prec1": best_prec1}, "val")
            state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_prec1": best_prec1,
                     "prec1": val_metrics["prec1"], "mmac": val_metrics["mmac"],
                     "args": dict(vars(args)), "version": 1}
            save_checkpoint(state, os.path.join(run_dir, LATEST))
            if val_metrics["prec1"] >= best_prec1:
                save_checkpoint(state, os.path.join(run_dir, BEST))
    logger.close()
    if ctx.is_main:
        print(f"=> done: best Prec@1 {best_prec1:.3f}; checkpoints in {run_dir}")
        if args.plot_ponder:
            plot_ponder(model, val_set, args, run_dir, ctx)


@torch.no_grad()
def plot_ponder(model, val_set, args, run_dir, ctx):
    from .plot import save_ponder_plots

    model.eval()
    images = first_images(val_set, args.plot_count)
    _, masks = model(images.to(ctx.device))
    if not masks:
        raise UserError("--plot_ponder needs a DynConv model (this one has no mask units)")
    mean, std = val_set_normalisation(val_set)
    out_dir = args.plot_dir or os.path.join(run_dir, "ponder")
    paths = save_ponder_plots(images, masks, out_dir, mean, std)
    print(f"=> {len(paths)} ponder plots written to {out_dir}")


def val_set_normalisation(dataset):
    """The Normalize(mean, std) of a dataset's transform, to show images in their colours."""
    from torchvision import transforms

    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    for t in getattr(dataset.transform, "transforms", []):
        if isinstance(t, transforms.Normalize):
            return t.mean, t.std
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
