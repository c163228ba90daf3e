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
            ax.set_axis_off()
            if b < num_blocks:
                ax.imshow(masks[b].hard[i, 0].cpu().numpy(), vmin=0, vmax=1, cmap="gray")
                ax.set_title(f"block {b}", fontsize=8)
        fig.savefig(prefix + "_masks.png", bbox_inches="tight", dpi=100)
        plt.close(fig)
        paths += [prefix + s for s in ("_input.png", "_ponder.png", "_masks.png")]
    return paths
