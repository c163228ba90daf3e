"""Ponder figures (where a DynConv network spends its computation) and the README's accuracy-vs-MMac plot.

Figures are built as `matplotlib.figure.Figure` objects rather than through pyplot: they need no screen or GUI
backend (PNG goes through Agg), pyplot keeps no reference to them (a loop over many images leaks nothing), and
the builders return them so that tests can read titles and colour-bar ticks before anything is saved.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from dynconv.decisions import SpatialDecision
from dynconv.models import model_config


def _figure(**kwargs):
    """A matplotlib Figure; matplotlib is imported here, not with the module, so that the scripts that import
    this one (compare, cifar_results) answer a bad flag before paying for it (~0.4 s)."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


MASK_COLUMNS = 6  # blocks per row of the mask grid
MAX_COST_TICKS = 17  # more integer ticks than this overlap on the colour bar of a deep network
ACCURACY_TITLE = "CIFAR-10: Prec@1 against MMac per image"


def spatial_masks(decisions):
    """The hard masks (N, 1, H, W) of the spatial decisions, in block order; other decision types carry no map."""
    return [d.hard.detach() for d in decisions if isinstance(d, SpatialDecision)]


def ponder_cost_map(decisions, index):
    """Blocks executed per position for image `index`: the sum of the hard masks of the spatial decisions, each
    upsampled (nearest, so a position counts 0 or 1 per block) to the first one's resolution. A float (H, W)."""
    masks = spatial_masks(decisions)
    size = masks[0].shape[-2:]
    maps = [F.interpolate(m[index:index + 1].float(), size=size, mode="nearest") for m in masks]
    return torch.cat(maps).sum(0)[0].cpu()


def cost_ticks(num_blocks):
    """Integer ticks 0..num_blocks; thinned for deep networks, keeping 0 and num_blocks."""
    step = max(1, math.ceil((num_blocks + 1) / MAX_COST_TICKS))
    ticks = list(range(0, num_blocks + 1, step))
    ticks[-1] = num_blocks
    return ticks


def _class_name(c, class_names):
    c = int(c)
    return str(class_names[c]) if class_names is not None else str(c)


def _caption(label, prediction, class_names):
    parts = []
    if label is not None:
        parts.append(f"true: {_class_name(label, class_names)}")
    if prediction is not None:
        parts.append(f"predicted: {_class_name(prediction, class_names)}")
    return "\n".join(parts)


def _draw_input(ax, image, mean, std, caption):
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    ax.imshow((image.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_title(caption, fontsize=9)
    ax.set_axis_off()


def _draw_cost(subfig, ax, cost, num_blocks):
    # one colour per count: boundaries at half-integers put every integer count in the middle of its own band
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm
    cmap = colormaps["viridis"].resampled(num_blocks + 1)
    norm = BoundaryNorm(np.arange(num_blocks + 2) - 0.5, cmap.N)
    shown = ax.imshow(cost.numpy(), cmap=cmap, norm=norm, interpolation="nearest")
    bar = subfig.colorbar(shown, ax=ax, ticks=cost_ticks(num_blocks))
    bar.set_label("blocks executed", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title("ponder cost", fontsize=9)
    ax.set_axis_off()


def mask_title(block, mask):
    """`b3 16x16 42%`: block index, resolution, and the fraction of positions computed of one image's mask."""
    h, w = mask.shape[-2:]
    return f"b{block} {h}x{w} {mask.float().mean().item():.0%}"


def _draw_masks(subfig, masks, index):
    cols = min(len(masks), MASK_COLUMNS)
    axes = subfig.subplots(math.ceil(len(masks) / cols), cols, squeeze=False)
    for b, ax in enumerate(axes.flat):
        if b >= len(masks):
            ax.set_axis_off()
            continue
        mask = masks[b][index, 0].cpu()
        ax.imshow(mask.float().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(mask_title(b, mask), fontsize=8)
        # ticks off but a grey frame kept: an all-white (or all-black) mask still shows where it is
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("0.5")
    subfig.suptitle("block masks: white = computed, black = skipped", fontsize=9)


def ponder_figure(images, decisions, index, mean, std, label=None, prediction=None, class_names=None):
    """The figure of image `index`: the input (titled with its true and predicted class), its ponder-cost map
    and every block's mask. `decisions` as the model returns them; only SpatialDecision ones are drawn."""
    masks = spatial_masks(decisions)
    if not masks:
        raise ValueError("ponder figures need spatial decisions (SpatialDecision); none were given")
    rows = math.ceil(len(masks) / MASK_COLUMNS)
    fig = _figure(figsize=(max(7.0, 1.6 * min(len(masks), MASK_COLUMNS)), 3.6 + 1.7 * rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.6, 1.7 * rows])
    ax_input, ax_cost = top.subplots(1, 2)
    _draw_input(ax_input, images[index], mean, std, _caption(label, prediction, class_names))
    cost = ponder_cost_map(decisions, index)
    _draw_cost(top, ax_cost, cost, len(masks))
    _draw_masks(bottom, masks, index)
    fig.suptitle(f"ponder cost: {cost.mean().item():.1f} of {len(masks)} blocks per position on average")
    return fig


def budgets_ponder_figure(images, decisions, index, mean, std, label=None, predictions=None, class_names=None):
    """A multi-target model's figure of image `index`: the input, then the ponder-cost map of every budget side
    by side. `decisions` and `predictions` ({budget: ...}) as the model returned them per budget."""
    budgets = list(decisions)
    num_blocks = len(spatial_masks(decisions[budgets[0]]))
    fig = _figure(figsize=(3.0 * (len(budgets) + 1), 3.4), layout="constrained")
    subfigs = fig.subfigures(1, len(budgets) + 1)
    _draw_input(subfigs[0].subplots(), images[index], mean, std, _caption(label, None, class_names))
    for subfig, budget in zip(subfigs[1:], budgets):
        ax = subfig.subplots()
        cost = ponder_cost_map(decisions[budget], index)
        _draw_cost(subfig, ax, cost, num_blocks)
        predicted = _caption(None, _item(predictions and predictions[budget], index), class_names)
        ax.set_title(f"budget {budget:g}: {cost.mean().item():.1f} of {num_blocks} blocks\n{predicted}", fontsize=9)
    fig.suptitle("ponder cost per budget (blocks executed per position)")
    return fig


def _item(values, i):
    return None if values is None else values[i]


def save_ponder_figures(images, decisions, out_dir, mean, std, labels=None, predictions=None,
                        class_names=None):
    """One PNG per image, `out_dir/NNN.png` (see ponder_figure); `labels`/`predictions` are per-image class
    indices (or None), `class_names` maps them to names. A dict of decisions (and of predictions), one entry per
    budget of a multi-target model, draws budgets_ponder_figure instead. Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    draw = budgets_ponder_figure if isinstance(decisions, dict) else ponder_figure
    paths = []
    for i in range(images.shape[0]):
        fig = draw(images, decisions, i, mean, std, _item(labels, i), predictions if isinstance(decisions, dict)
                   else _item(predictions, i), class_names)
        path = os.path.join(out_dir, f"{i:03d}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


# the markers and colours of DynConv's own families (row_family); a model's config may name its own (plot_style),
# another family gets a spare colour
DYNCONV_STYLES = {"dense": ("o", "black"), "DynConv": ("s", "tab:blue"), "DynConv multi-target": ("D", "tab:orange")}
SPARE_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def _config_style(row):
    """The row's model's plot_style (family, marker, colour), or None (DynConv's, or a model not registered)."""
    try:
        return model_config(row["model"]).plot_style
    except KeyError:
        return None


def row_family(row):
    """The family of a result row: its model's own (ModelConfig.plot_style, e.g. DGC, or ConvNeXt dense or
    DynConv), else its method's name (`method`), a DynConv multi-target model, DynConv at one budget, or dense."""
    style = _config_style(row)
    if style:
        return style[0]
    if row.get("method"):
        return row["method"]
    if row.get("targets"):
        return "DynConv multi-target"
    return "DynConv" if row["budget"] >= 0 else "dense"


def model_name(row):
    """The row's model with the options it changed (`variant`), e.g. "dydensenet86 (gate_factor=1)"."""
    return row["model"] + (f" ({row['variant']})" if row.get("variant") else "")


def family_styles(rows):
    """{family: (marker, colour)} for the rows' families: DynConv's, the models' own, the spare colours for the
    rest in name order."""
    styles = dict(DYNCONV_STYLES)
    styles.update({s[0]: s[1:] for s in map(_config_style, rows) if s})
    others = sorted({row_family(r) for r in rows} - set(styles))
    return {**styles, **{f: ("X", SPARE_COLOURS[i % len(SPARE_COLOURS)]) for i, f in enumerate(others)}}


def schedules(rows):
    """The training schedule lengths (epochs) of the rows that name theirs."""
    return {r["epochs"] for r in rows if r.get("epochs")}


def curves(rows):
    """The curves of result rows: {label: (rows, line style, what each point is annotated with)}.
    Dense models: one curve per network type (`arch`) through its models; DynConv: one per model through its
    budgets, a multi-target model and a variant (`variant`, e.g. tiles) as curves of their own; another method
    (`method`): one per method and network type through its models. Rows varied in input size (`varied` ==
    "resolution") join their run's own row in a curve of their own, annotated with the resolution: a different
    axis of variation than budgets. Runs trained on schedules of different lengths (`epochs`) are never joined:
    one curve per schedule, its length in the label."""
    groups = {}
    several = len(schedules(rows)) > 1

    def add(key, row, label, style, annotate):
        if several and row.get("epochs"):
            key, label = (*key, row["epochs"]), f"{label}, {row['epochs']} epochs"
        groups.setdefault(key, (label, [], style, annotate))[1].append(row)

    native = [r for r in rows if not r.get("varied")]
    for r in native:
        arch = r.get("arch", "ResNet")
        if r.get("method"):
            add(("method", r["method"], arch), r, f"{r['method']} {arch}", ":", "model")
        elif r["budget"] < 0:
            add(("dense", arch), r, f"{arch} (dense)", "-", "model")
        else:
            targets = tuple(r.get("targets", ()))  # a variant (e.g. tiles) is a network of its own: its own curve
            style = "-." if targets else ":" if r.get("variant") else "--"
            add(("budgets", model_name(r), targets), r, f"DynConv {model_name(r)}"
                + (", one multi-target network" if targets else ""), style, "budget")
    for r in rows:
        if r.get("varied") == "resolution":
            name = r["model"] + ("" if r["budget"] < 0 else f" b={r['budget']:g}")
            own = [n for n in native if n.get("run") == r["run"] and n["budget"] == r["budget"]]
            groups.setdefault(("resolution", r["run"], r["budget"]),
                              (f"{name}, input size varied", own, ":", "resolution"))[1].append(r)
    return {label: (members, style, annotate) for label, members, style, annotate in groups.values()}


def comparison_figure(rows, x="mmac", xlabel="MMac per image", title=ACCURACY_TITLE, caption=None, log_x=False):
    """Prec@1 against `x` (a row key, or a function of a row; rows without a value are left out): the curves of
    curves(rows), one marker and colour per family (row_family), each point annotated with its model name, budget
    or input size; curves of schedules shorter than the longest faded. `caption`: a line under the plot (e.g. what
    the x axis counts); `log_x`: a logarithmic x axis (latencies spanning orders of magnitude)."""
    value = x if callable(x) else (lambda r: r.get(x))
    rows = [r for r in rows if value(r) is not None]
    styles = family_styles(rows)
    fig = _figure(figsize=(8.4, 4.8 if caption else 4.5))  # the legend beside the axes: no curve hidden under it
    ax = fig.subplots()
    longest = max(schedules(rows), default=None)
    for label, (members, style, annotate) in curves(rows).items():
        members = sorted(members, key=value)
        marker, colour = styles[row_family(members[-1])]
        thin = annotate == "resolution"
        shorter = members[-1].get("epochs", longest) < longest if longest else False  # faded behind the longest
        ax.plot([value(r) for r in members], [r["prec1"] for r in members], marker=marker, linestyle=style,
                color=colour, label=label, alpha=0.6 if thin else 0.4 if shorter else 1.0,
                markerfacecolor="none" if thin else colour)
        for r in members:
            if annotate == "resolution" and not r.get("varied"):
                continue  # the run's own point, annotated on its own curve
            text = {"model": model_name(r), "budget": f"b={r['budget']:g}",
                    "resolution": f"{r.get('resolution', 32)}px"}[annotate]
            ax.annotate(text, (value(r), r["prec1"]), textcoords="offset points", fontsize=7,
                        xytext=(4, -10) if r.get("targets") or annotate == "model" else (4, 4))
    ax.margins(x=0.08)  # room for the rightmost points' annotations
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if log_x:
        ax.set_xscale("log")
    ax.set_ylabel("Prec@1 on the CIFAR-10 test set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    return fig


def accuracy_vs_macs_figure(rows, title=ACCURACY_TITLE):
    """The README's plot: Prec@1 against MMac per image of result rows (dynconv/scripts/cifar_results.py)."""
    return comparison_figure(rows, title=title)


def plot_accuracy_vs_macs(results_paths, out_path, title=ACCURACY_TITLE):
    """The README's plot: accuracy_vs_macs_figure of the rows of one or more results .jsonl files."""
    from .logger import read_jsonl

    paths = [results_paths] if isinstance(results_paths, str) else results_paths
    rows = [row for path in paths for row in read_jsonl(path)]
    accuracy_vs_macs_figure(rows, title).savefig(out_path, dpi=110)


def channel_selection_figure(frequencies, images):
    """Channel-choosing layers (e.g. DGC): per layer a heat map of how often each head (row) kept each input
    channel (column) over `images` evaluation images. `frequencies`: one (heads, channels) tensor per layer."""
    cols = min(6, len(frequencies))
    rows = -(-len(frequencies) // cols)
    fig = _figure(figsize=(2.6 * cols, 1.2 + 1.1 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(frequencies):
            ax.set_axis_off()
            continue
        shown = ax.imshow(frequencies[i].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_title(f"layer {i + 1}: {frequencies[i].shape[1]} ch, kept {frequencies[i].mean():.2f}", fontsize=7)
        ax.set_yticks(range(frequencies[i].shape[0]))
        ax.tick_params(labelsize=6)
    fig.colorbar(shown, ax=axes, shrink=0.6, label="fraction of images")
    fig.suptitle(f"input channels kept per head (rows), over {images} images")
    return fig


def decision_details_figure(details, index):
    """Image `index`'s decision details of every layer (e.g. PEDConv's attention vectors): a row per layer, a
    column per named tensor, each (rank, size) shown as a heat map (k x k vectors at their kernel's shape)."""
    names = list(details[0])
    fig = _figure(figsize=(3.2 * len(names), 0.5 + 0.55 * len(details)), layout="constrained")
    axes = fig.subplots(len(details), len(names), squeeze=False)
    for row, detail in enumerate(details):
        for col, name in enumerate(names):
            values = detail[name][index].float().cpu()
            side = int(values.shape[-1] ** 0.5)
            shown = values.reshape(-1, side, side)[0] if side * side == values.shape[-1] and "k" in name \
                else values.reshape(-1, values.shape[-1])
            image = axes[row, col].imshow(shown.numpy(), aspect="auto", vmin=0, vmax=1, cmap="magma",
                                          interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(f"{name} ({values.shape[-1]})", fontsize=8)
        axes[row, 0].set_ylabel(f"{row + 1}", rotation=0, fontsize=7, labelpad=8)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention (sigmoid)")
    fig.suptitle(f"image {index}: attention per layer (rows)", fontsize=9)
    return fig
