"""Training throughput of CIFAR models, dynamic against static, on random data (CPU or --device).

Per model, its variants: a network with spatial gates as DynConv at budget 0.5 (sparsity objective on) and dense;
a network with gates of its own (DGC) as configured, its gates at the end of their training schedule (DGC: fully
pruned), its static form (the config's static_options: DGC with gate factor 1, every channel kept) and its backbone
(the config's backbone: DGC's convs as plain BN-ReLU-convs, no generators or heads: the static network it is built
on, a reference for its speed); a network with dynamic weights (PEDConv) as it is. Each step is timed separately and
every variant of every model alternates step by step, so that machine noise hits all alike; images/s come from the
median step time, and each row's ratio is against the reference (--reference: resnet32 dense by default, where
measured; else the first row). DynConv's fused CPU kernels (dynconv.fused) are used when they build; DYNCONV_FUSED=0
measures the eager ops instead. The first line printed says which ran.
"""
import csv
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dynconv import SparsityCriterion, fused, set_gate_schedule  # noqa: E402
from dynconv.models import Decides, build_model, list_models, model_config  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser, device_problem  # noqa: E402
from dynconv.utils.errors import run_cli  # noqa: E402

EXAMPLES = """examples:
  python -m dynconv.benchmarks.train_speed --models resnet8 resnet32 --batchsize 128 --steps 20 --csv train_speed.csv
  # DGC against its unpruned form (g = 1) and the dense ResNet-32
  python -m dynconv.benchmarks.train_speed --models dydensenet86 resnet32 --batchsize 64 --steps 5
  # the eager ops instead of the fused CPU kernels, for comparison
  DYNCONV_FUSED=0 python -m dynconv.benchmarks.train_speed --models resnet32 --steps 10
"""


def make_step(model, budget, images, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsity = SparsityCriterion(budget, num_epochs=100) if budget is not None else None
    model.train()

    def step():
        logits, decisions = model(images)
        loss = F.cross_entropy(logits, target)
        if sparsity is not None:
            loss = loss + sparsity(decisions, epoch=10)[0]
        terms = [d.loss for d in decisions if getattr(d, "loss", None) is not None]  # e.g. DGC's lasso term
        if terms:
            loss = loss + sum(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
    return step


def variants(name):
    """(variant name, model, budget or None) of `name`: what train_speed compares (see the module docstring)."""
    config = model_config(name)
    if config.gates is Decides.SPATIAL:
        sparse = build_model(name, spatial_gates=True)
        set_gate_schedule(sparse, noise=True)
        return [("dense", build_model(name), None), ("DynConv 0.5", sparse, 0.5)]
    dynamic = build_model(name)
    set_gate_schedule(dynamic, progress=1.0)  # the gates as in the last part of training (DGC: fully pruned)
    rows = [("dynamic", dynamic, None)]
    if config.static_options:
        static = build_model(name, options=config.static_options)
        label = " ".join(f"{k} {v:g}" for k, v in config.static_options.items())
        rows.append((f"static ({label})", static, None))
    if config.backbone:
        rows.append(("backbone", config.backbone(build_model(name, options=config.static_options)), None))
    return rows


def measure(names, batchsize, steps, warmup, device, resolution):
    """One row per variant of every model, all alternated step by step."""
    images = torch.randn(batchsize, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batchsize,), device=device)
    runs = [(name, label, make_step(model.to(device, memory_format=torch.channels_last), budget, images, target))
            for name in names for label, model, budget in variants(name)]
    times = [[] for _ in runs]
    for i in range(warmup + steps):
        for (_, _, step), measured in zip(runs, times):
            start = time.perf_counter()
            step()
            if i >= warmup:
                measured.append(time.perf_counter() - start)
    return [{"model": name, "variant": label, "batchsize": batchsize,
             "img_s": round(batchsize / statistics.median(measured), 1)}
            for (name, label, _), measured in zip(runs, times)]


def with_ratios(rows, reference):
    """Each row's images/s against the reference model's static row (dense, or its static form; else its first),
    or against the first row when the reference was not measured."""
    own = [r for r in rows if r["model"] == reference]
    base = next((r for r in own if r["variant"] == "dense" or r["variant"].startswith("static")), (own or rows)[0])
    label = f"vs {base['model']} {base['variant']}"
    return [{**r, label: round(r["img_s"] / base["img_s"], 3)} for r in rows]


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet32"], choices=list_models("cifar"),
                   metavar="NAME", help=f"CIFAR networks to measure ({', '.join(list_models('cifar'))})")
    p.add_argument("--reference", default="resnet32", metavar="NAME",
                   help="the model whose static (dense) row the ratios are against, when measured (else the first row)")
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
    rows = with_ratios(measure(args.models, args.batchsize, args.steps, args.warmup, torch.device(args.device),
                               args.resolution), args.reference)
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(f"{row[h]!s:>{w}}" for h, w in zip(header, widths)))
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
