"""Ponder plots: where a DynConv network spends its computation, saved as PNG files (no screen needed)."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def ponder_cost_map(masks, index):
    """Sum over blocks of the hard masks of image `index`, upsampled (nearest) to the first block's size."""
    size = masks[0].hard.shape[-2:]
    maps = [F.interpolate(m.hard[index:index + 1].float(), size=size, mode="nearest") for m in masks]
    return torch.cat(maps).sum(0)[0]


def _denormalize(image, mean, std):
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def save_ponder_plots(images, masks, out_dir, mean, std):
    """Per image: <i>_input.png, <i>_ponder.png (colour bar 0..#blocks) and <i>_masks.png (every block's mask).

    Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    num_blocks = len(masks)
    for i in range(images.shape[0]):
        prefix = os.path.join(out_dir, f"{i:03d}")
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(_denormalize(images[i], mean, std))
        ax.set_axis_off()
        fig.savefig(prefix + "_input.png", bbox_inches="tight", dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(3.6, 3))
        shown = ax.imshow(ponder_cost_map(masks, i).cpu().numpy(), vmin=0, vmax=num_blocks, cmap="viridis")
        fig.colorbar(shown, ax=ax)
        ax.set_title("ponder cost (blocks executed)")
        ax.set_axis_off()
        fig.savefig(prefix + "_ponder.png", bbox_inches="tight", dpi=100)
        plt.close(fig)

        cols = min(num_blocks, 6)
        rows = (num_blocks + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
        for b, ax in enumerate(axes.flat):
            if b < num_blocks:  # white = computed; ticks off but the frame kept, so all-white masks show
                ax.imshow(masks[b].hard[i, 0].cpu().numpy(), vmin=0, vmax=1, cmap="gray")
                ax.set_title(f"block {b}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_axis_off()
        fig.savefig(prefix + "_masks.png", bbox_inches="tight", dpi=100)
        plt.close(fig)
        paths += [prefix + s for s in ("_input.png", "_ponder.png", "_masks.png")]
    return paths


def plot_accuracy_vs_macs(results_path, out_path):
    """Prec@1 against MMac per image from a results .jsonl (scripts/cifar_results.py): dense ResNets as one
    curve, DynConv models (one curve per network) with their budgets as labels."""
    from .logger import read_jsonl

    rows = read_jsonl(results_path)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    dense = sorted((r for r in rows if r["budget"] < 0), key=lambda r: r["mmac"])
    if dense:
        ax.plot([r["mmac"] for r in dense], [r["prec1"] for r in dense], "o-", color="black", label="ResNet (dense)")
        for r in dense:
            ax.annotate(r["model"], (r["mmac"], r["prec1"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for model in sorted({r["model"] for r in rows if r["budget"] >= 0}):
        sparse = sorted((r for r in rows if r["budget"] >= 0 and r["model"] == model), key=lambda r: r["mmac"])
        ax.plot([r["mmac"] for r in sparse], [r["prec1"] for r in sparse], "s--", label=f"DynConv {model}")
        for r in sparse:
            ax.annotate(f"b={r['budget']:g}", (r["mmac"], r["prec1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set_xlabel("MMac per image")
    ax.set_ylabel("Prec@1 on the CIFAR-10 test set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
