"""Inference speed of DynConv ResNets: dense model vs masked-dense model vs the sparse engine.

    python benchmarks/speedtest.py --models resnet50 resnet101 --batch-sizes 1 16 \\
        --densities 0.1 0.3 0.5 1.0 --masks clustered --csv out.csv --plot out.png

Masks are synthetic at the requested density (spatially clustered blobs like trained masks, or i.i.d. random
pixels, the worst case since dilation then covers almost everything), or come from a trained checkpoint
(--checkpoint, with images from --data when given). For each configuration: the median time of each variant
over --runs runs after --warmup runs, the variants alternated run by run; MMac of the dense and the sparse
model; ideal speedup = dense MMac / sparse MMac; achieved speedup = dense time / engine time; efficiency =
achieved / ideal. The dense model has the same weights (the DynConv model without its mask units). OpenMP threads
wait actively (OMP_WAIT_POLICY=ACTIVE unless set otherwise), for every variant alike.
"""
import argparse
import csv
import os
import statistics
import sys
import time

# OpenMP workers spin between parallel regions instead of sleeping (the usual setting for CPU inference latency).
# At batch 1 the engine runs many short ops between its matrix products, and waking sleeping workers costs it
# ~5% here. Read when torch loads OpenMP, hence before the import; export OMP_WAIT_POLICY=PASSIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dynconv import MaskUnit, count_mmac  # noqa: E402
from dynconv.gates import gate_state_keys  # noqa: E402
from dynconv.sparse.engine import SparseEngine  # noqa: E402
from dynconv.sparse.masks import KINDS, install_synthetic_masks  # noqa: E402
from dynconv.sparse.ops import BACKENDS  # noqa: E402
from models import create_model, list_models, model_config  # noqa: E402
from utils.checkpoint import load_checkpoint, load_model_state  # noqa: E402

COLUMNS = ["model", "batch", "density", "masks", "active_fraction", "dense_ms", "masked_ms", "engine_ms",
           "dense_mmac", "sparse_mmac", "ideal_speedup", "speedup", "efficiency"]


def family_of(name):
    return "cifar" if name in list_models("cifar") else "imagenet"


def time_variants(variants, runs, warmup, device):
    """Median milliseconds of each variant, alternating them run by run."""
    times = {name: [] for name in variants}
    for i in range(warmup + runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def build_models(name, num_classes, device, checkpoint=None):
    """(dense, sparse) models with the same weights, eval mode, channels-last."""
    sparse = create_model(name, family_of(name), gate_layer=MaskUnit, num_classes=num_classes)
    if checkpoint is not None:
        load_model_state(sparse, model_config(name).checkpoint_filter(checkpoint["state_dict"], sparse), "--checkpoint")
    dense = create_model(name, family_of(name), num_classes=num_classes)
    gates = gate_state_keys(sparse)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if k not in gates})
    return [m.eval().to(device, memory_format=torch.channels_last) for m in (dense, sparse)]


def measure(dense, sparse, images, runs, warmup, backend):
    engine = SparseEngine(sparse, backend=backend)
    with torch.no_grad():
        ms = time_variants({"dense": lambda: dense(images), "masked": lambda: sparse(images),
                            "engine": lambda: engine(images)}, runs, warmup, images.device)
        dense_mmac, sparse_mmac = count_mmac(dense, images), count_mmac(sparse, images)
        masks = sparse(images)[1]
    active = sum(m.hard.sum().item() for m in masks) / sum(m.hard.numel() for m in masks)  # spatial decisions
    ideal = dense_mmac / sparse_mmac
    speedup = ms["dense"] / ms["engine"]
    return {"active_fraction": round(active, 4), "dense_ms": round(ms["dense"], 3),
            "masked_ms": round(ms["masked"], 3), "engine_ms": round(ms["engine"], 3),
            "dense_mmac": round(dense_mmac, 3), "sparse_mmac": round(sparse_mmac, 3),
            "ideal_speedup": round(ideal, 3), "speedup": round(speedup, 3), "efficiency": round(speedup / ideal, 3)}


def checkpoint_images(args, name, batch, resolution):
    """A batch of evaluation images from --data (CIFAR or image-folder layout), else random inputs."""
    if not args.data:
        return torch.randn(batch, 3, resolution, resolution)
    from utils.data import cifar10_datasets, imagenet_style_datasets, first_images

    if family_of(name) == "cifar":
        val = cifar10_datasets(args.data, model_config(name))[1]
    else:
        val = imagenet_style_datasets(args.data, model_config(name), resolution=resolution)[1]
    return first_images(val, batch)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet50", "resnet101"],
                   choices=list_models("cifar") + list_models("imagenet"))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--masks", nargs="+", default=["clustered"], choices=KINDS)
    p.add_argument("--checkpoint", default=None, help="use a trained model's own masks (one model)")
    p.add_argument("--data", default=None, help="with --checkpoint: evaluation images from this data set root")
    p.add_argument("--resolution", type=int, default=None, help="input size (default 32 CIFAR, 224 ImageNet)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None, help="PNG of achieved against ideal speedup")
    args = p.parse_args()
    if args.checkpoint and len(args.models) != 1:
        p.error("--checkpoint needs exactly one --models name")
    return args


def model_rows(name, args, checkpoint, device):
    """One measured row per batch size and mask configuration of model `name`, printed as they come."""
    resolution = args.resolution or (32 if family_of(name) == "cifar" else 224)
    num_classes = checkpoint["state_dict"]["fc.weight"].shape[0] if checkpoint else (
        10 if family_of(name) == "cifar" else 1000)
    configs = [("trained", None)] if checkpoint else [(k, d) for k in args.masks for d in args.densities]
    for batch in args.batch_sizes:
        for kind, density in configs:
            dense, sparse = build_models(name, num_classes, device, checkpoint)
            if checkpoint is None:
                install_synthetic_masks(sparse, density, kind)
                images = torch.randn(batch, 3, resolution, resolution)
            else:
                images = checkpoint_images(args, name, batch, resolution)
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            row = {"model": name, "batch": batch, "density": density if density is not None else "trained",
                   "masks": kind, **measure(dense, sparse, images, args.runs, args.warmup, args.backend)}
            print(" ".join(f"{str(row[c]):>15}" for c in COLUMNS), flush=True)
            yield row


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None
    print(f"# {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(" ".join(f"{c:>15}" for c in COLUMNS), flush=True)
    rows = [row for name in args.models for row in model_rows(name, args, checkpoint, torch.device(args.device))]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    groups = sorted({(r["model"], r["batch"], r["masks"]) for r in rows})
    for model, batch, masks in groups:
        sel = [r for r in rows if (r["model"], r["batch"], r["masks"]) == (model, batch, masks)]
        ax.plot([r["ideal_speedup"] for r in sel], [r["speedup"] for r in sel], "o-",
                label=f"{model}, batch {batch}, {masks}")
    top = max(max(r["ideal_speedup"] for r in rows), max(r["speedup"] for r in rows)) * 1.05
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="ideal (efficiency 1)")
    ax.set_xlabel("ideal speedup (dense MMac / sparse MMac)")
    ax.set_ylabel("achieved speedup (dense time / engine time)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
