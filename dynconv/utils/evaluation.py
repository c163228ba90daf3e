"""-e: a checkpoint's Prec@k and MMac (per budget of a multi-target model), through the sparse engine with
--fast, and the figures of what the model decided (--plot_ponder: masks, channel selection, decision details)."""
import os

import torch

from dynconv import ChannelDecision, SpatialDecision
from dynconv.models import model_config
from .budgets import evaluated_targets
from .data import class_names, first_images
from .errors import UserError
from .training import mean_over_targets, print_eval, validate


def evaluate(model, val_loader, val_set, checkpoint, args, topk, run_dir, ctx):
    """-e: Prec@k and MMac of the checkpoint (with --fast also through the sparse engine); prints the lines.
    With --plot_only, only the ponder figures of the first images."""
    show, epoch = ctx.is_main, int(checkpoint.get("epoch", 0))
    if args.plot_only:
        if ctx.is_main:
            plot_ponder(model, val_set, val_loader, args, run_dir, ctx)
        return {"epoch": epoch}
    per_target = {}
    for target in evaluated_targets(args) or (None,):  # a multi-target model: every budget (or --budget's)
        if args.fast:
            metrics = evaluate_fast(model, val_loader, ctx, topk, args, show, target)
        else:
            metrics = validate(model, val_loader, ctx, topk, args.full_macs, args.amp, show, target=target)
        metrics["epoch"] = epoch
        if ctx.is_main:
            print_eval(epoch, metrics, "" if target is None else f"[budget {target:g}] ")
        per_target[target] = metrics
    metrics = per_target[None] if None in per_target else mean_over_targets(per_target)
    paper = model_config(args.model).paper_count
    if paper is not None:  # e.g. the DGC paper's own count (it counts more kinds of layers than ours)
        label, count = paper
        metrics["paper_mmac"] = count(model.eval(), val_set[0][0][None].to(next(model.parameters()).device))
        if ctx.is_main:
            print(f"* FLOPS as {label}:  {metrics['paper_mmac']:.6f} MMac")
    if ctx.is_main and args.plot_ponder:
        plot_ponder(model, val_set, val_loader, args, run_dir, ctx)
    return metrics


def evaluate_fast(model, loader, ctx, topk, args, show, target=None):
    """-e --fast: the masked-dense pass (Prec@k, MMac, speed), then the sparse engine (Prec@k, speed), at
    `target` (a budget of a multi-target model). The engine computes the same function, so the two Prec@k agree
    but for decisions within float rounding of their threshold (print_eval counts such a gap in images)."""
    from dynconv.sparse.engine import SparseEngine

    try:
        engine = SparseEngine(model.eval(), backend=args.backend)
    except ValueError as e:
        raise UserError(str(e))
    reference = validate(model, loader, ctx, topk, args.full_macs, args.amp, show, timed=True, target=target)
    fast = validate(model, loader, ctx, topk, amp=args.amp, show_progress=show, forward=engine, timed=True,
                    target=target)
    return {**reference, **{k: fast[k] for k in fast if k.startswith("prec")},
            "reference_prec1": reference["prec1"], "reference_images_per_s": reference["images_per_s"],
            "evaluated_images": len(loader.dataset),
            "images_per_s": fast["images_per_s"], "backend": engine.backend}


@torch.no_grad()
def plot_channel_selection(model, loader, args, run_dir, ctx):
    """How often each head of every channel-choosing layer keeps each input channel, over the evaluation set (this
    process's share under torchrun): one heat map per layer, in `<plot dir>/channels.png`."""
    from .plot import channel_selection_figure

    sums, count = None, 0
    for images, _ in loader:
        _, decisions = model(images.to(ctx.device, memory_format=torch.channels_last))
        kept = [d.kept.sum(0) for d in decisions if isinstance(d, ChannelDecision)]
        sums = kept if sums is None else [a + b for a, b in zip(sums, kept)]
        count += images.shape[0]
    out_dir = args.plot_dir or os.path.join(run_dir, "ponder")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "channels.png")
    channel_selection_figure([s.cpu().reshape(-1, s.shape[-1]) / count for s in sums], count).savefig(path, dpi=100)
    print(f"=> channel selection frequencies of {len(sums)} layers over {count} images written to {path}")


def plot_decision_details(images, decisions, args, run_dir, val_set):
    """Per image, what every layer's decision details (e.g. PEDConv's attention vectors) hold: one figure each."""
    from .plot import decision_details_figure

    out_dir = args.plot_dir or os.path.join(run_dir, "ponder")
    os.makedirs(out_dir, exist_ok=True)
    details = [d.detail for d in decisions if getattr(d, "detail", None)]
    for i in range(images.shape[0]):
        path = os.path.join(out_dir, f"{i:03d}.png")
        decision_details_figure(details, i).savefig(path, dpi=100)
    print(f"=> {images.shape[0]} figures of {len(details)} layers' decisions written to {out_dir}")


@torch.no_grad()
def plot_ponder(model, val_set, loader, args, run_dir, ctx):
    """One figure per image of the first --plot_count evaluation images: input (true and predicted class),
    ponder cost, every block's mask. Models that choose channels: plot_channel_selection instead."""
    from .plot import save_ponder_figures

    model.eval()
    images, labels = first_images(val_set, args.plot_count)
    outputs = {t: model(images.to(ctx.device, memory_format=torch.channels_last), target=t)
               for t in evaluated_targets(args) or (None,)}  # a multi-target model: every budget, side by side
    decisions = {t: d for t, (_, d) in outputs.items()}
    predictions = {t: logits.argmax(1).cpu() for t, (logits, _) in outputs.items()}
    first = decisions[next(iter(decisions))]
    if any(isinstance(d, ChannelDecision) for d in first):
        return plot_channel_selection(model, loader, args, run_dir, ctx)
    if any(getattr(d, "detail", None) for d in first):
        return plot_decision_details(images, first, args, run_dir, val_set)
    if not any(isinstance(d, SpatialDecision) for d in first):
        raise UserError("--plot_ponder needs a model with gates (this one has none)")
    if None in decisions:
        decisions, predictions = decisions[None], predictions[None]
    config = model_config(args.model)
    out_dir = args.plot_dir or os.path.join(run_dir, "ponder")
    paths = save_ponder_figures(images, decisions, out_dir, config.mean, config.std, labels=labels,
                                predictions=predictions, class_names=class_names(val_set))
    print(f"=> {len(paths)} ponder figures written to {out_dir}")
