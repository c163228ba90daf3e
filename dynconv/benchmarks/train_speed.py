"""Training throughput of dense vs DynConv (budget 0.5) ResNets on random data (CPU or --device).

Each step is timed separately; the two variants alternate step by step so that machine noise hits both;
images/s come from the median step time. DynConv's fused CPU kernels (dynconv.fused) are used when they build;
DYNCONV_FUSED=0 measures the eager ops instead. The first line printed says which ran.
"""
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dynconv import MaskUnit, SparsityCriterion, fused, set_gate_schedule  # noqa: E402
from dynconv.models import create_model, list_models  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser, device_problem  # noqa: E402
from dynconv.utils.errors import run_cli  # noqa: E402

EXAMPLES = """examples:
  python -m dynconv.benchmarks.train_speed --models resnet8 resnet32 --batchsize 128 --steps 20 --csv train_speed.csv
  # the eager ops instead of the fused CPU kernels, for comparison
  DYNCONV_FUSED=0 python -m dynconv.benchmarks.train_speed --models resnet32 --steps 10
"""


def make_step(model, budget, images, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsity = SparsityCriterion(budget, num_epochs=100) if budget >= 0 else None
    model.train()

    def step():
        logits, masks = model(images)
        loss = F.cross_entropy(logits, target)
        if sparsity is not None:
            loss = loss + sparsity(masks, epoch=10)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
    return step


def measure(name, batchsize, steps, warmup, device, resolution):
    images = torch.randn(batchsize, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batchsize,), device=device)
    dense = create_model(name).to(device, memory_format=torch.channels_last)
    sparse = create_model(name, gate_layer=MaskUnit).to(device, memory_format=torch.channels_last)
    set_gate_schedule(sparse, noise=True)
    steps_fn = {"dense": make_step(dense, -1, images, target), "sparse": make_step(sparse, 0.5, images, target)}
    times = {"dense": [], "sparse": []}
    for i in range(warmup + steps):
        for variant, step in steps_fn.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[variant].append(time.perf_counter() - start)
    dense_ips = batchsize / statistics.median(times["dense"])
    sparse_ips = batchsize / statistics.median(times["sparse"])
    return {"model": name, "batchsize": batchsize, "dense_img_s": round(dense_ips, 1),
            "sparse_img_s": round(sparse_ips, 1), "ratio": round(sparse_ips / dense_ips, 3)}


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet32"], choices=list_models("cifar"),
                   metavar="NAME", help=f"CIFAR networks to measure ({', '.join(list_models('cifar'))})")
    p.add_argument("--batchsize", type=int, default=128, help="images per training step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--resolution", type=int, default=32, help="input size")
    p.add_argument("--device", default="cpu", help="device to train on")
    p.add_argument("--csv", help="also write the table here")
    args = p.parse_args(argv)
    for flag, value, low in (("--batchsize", args.batchsize, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--resolution", args.resolution, 8)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
        p.error(f"--csv {args.csv}: the folder {os.path.dirname(args.csv)} does not exist")
    if device_problem(args.device):
        p.error(device_problem(args.device))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    probe = torch.zeros(1, 2, 1, 1, device=args.device).contiguous(memory_format=torch.channels_last)
    print(f"# {torch.get_num_threads()} threads, fused CPU kernels: {'on' if fused.usable(probe) else 'off'}")
    rows = [measure(m, args.batchsize, args.steps, args.warmup, torch.device(args.device), args.resolution)
            for m in args.models]
    header = list(rows[0])
    print(" ".join(f"{h:>12}" for h in header))
    for row in rows:
        print(" ".join(f"{row[h]:>12}" for h in header))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
