"""Inference speed of Dynamic Group Convolution: the masked operator (every channel convolved, the dropped ones
times a saliency of zero: the paper's code and the model's own forward) against the engine's gathered path (only
each image's kept channels) and a static group conv of the same kept width (H groups of K channels: what the
gathered path would cost without gathering or per-image weights).

Per DGC layer (whole layer: BN + ReLU, saliency generators, conv; the static conv alone) and for the whole
network (model forward against SparseEngine), at each batch size: median times over --runs alternated runs after
--warmup; ideal speedup = the masked layer's MACs / the gathered layer's MACs (both with the generators);
efficiency = achieved / ideal. The models run in eval mode with every layer pruned to its trained width (inactive
= round(C (1 - gate factor))) and BN statistics from a few training-mode batches of random images. Prints a table
per model (the 1x1 and k x k layers summed, and the network), and --csv keeps every layer's row.
"""
import csv
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as dynconv/benchmarks/speedtest.py: spinning OpenMP workers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dynconv.sparse.engine import SparseEngine  # noqa: E402
from dynconv.sparse.ops import get_ops  # noqa: E402
from dynconv.sparse.plans import EngineSettings  # noqa: E402
from dynconv.sparse.plans.dgc import DGCConvPlan  # noqa: E402
from dynconv.models import build_model  # noqa: E402
from dynconv.models.dgc import DGCConv  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser  # noqa: E402
from dynconv.utils.errors import run_cli  # noqa: E402
from dynconv.utils.timing import median_ms  # noqa: E402

DEFAULT_MODELS = ("dydensenet86:32", "dyresnet18:224")
EXAMPLES = """examples:
  python -m dynconv.benchmarks.dgc_speed                                   # dydensenet86 at 32x32, dyresnet18 at 224x224
  python -m dynconv.benchmarks.dgc_speed --models dydensenet86:32 --batch-sizes 64 --csv dgc.csv
"""


def speedtest_argv(name, resolution, batch_sizes, runs, warmup):
    """This benchmark's arguments for one model of dynconv/benchmarks/speedtest.py's --models."""
    return ["--models", f"{name}:{resolution}", "--batch-sizes", *map(str, batch_sizes), "--runs", str(runs),
            "--warmup", str(warmup)]


def pruned_model(name, resolution):
    """The model in eval mode with trained-like BN statistics and every DGC layer at its final width."""
    torch.manual_seed(0)
    model = build_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        model.train()(torch.randn(8, 3, resolution, resolution))
    for m in model.modules():
        if isinstance(m, DGCConv):
            m.gate.inactive.fill_(round(m.in_channels * (1 - m.gate.gate_factor)))
    return model.eval().to(memory_format=torch.channels_last)


def layer_inputs(model, images):
    """{DGC layer: its input for `images`} from one forward pass."""
    inputs, handles = {}, []
    for m in model.modules():
        if isinstance(m, DGCConv):
            handles.append(m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0])))
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return inputs


def layer_row(layer, x, runs, warmup):
    plan = DGCConvPlan(layer, get_ops("torch"), EngineSettings())
    heads, kept = layer.heads, plan.kept
    static_input = torch.randn(x.shape[0], heads * kept, *x.shape[-2:]).contiguous(memory_format=torch.channels_last)
    static_weight = torch.randn(layer.out_channels, kept, layer.kernel_size, layer.kernel_size)
    with torch.no_grad():
        _, decision = layer(x)
        masked_macs = float(decision.positions * decision.cost.macs * decision.kept.numel() + decision.overhead.macs)
        gathered_macs = float(decision.macs())
        ms = median_ms({"masked": lambda: layer(x), "gathered": lambda: plan(x),
                        "static": lambda: F.conv2d(static_input, static_weight, None, layer.stride, layer.padding,
                                                   groups=heads)}, runs, warmup)
    return {"kernel": layer.kernel_size, "in": layer.in_channels, "out": layer.out_channels, "kept": kept,
            "size": x.shape[-1], "masked_ms": ms["masked"], "gathered_ms": ms["gathered"], "static_ms": ms["static"],
            "ideal": masked_macs / gathered_macs}


def summary(name, batch, rows, network):
    lines = []
    for kernel in sorted({r["kernel"] for r in rows}):
        part = [r for r in rows if r["kernel"] == kernel]
        masked, gathered = sum(r["masked_ms"] for r in part), sum(r["gathered_ms"] for r in part)
        static = sum(r["static_ms"] for r in part)
        ideal = statistics.fmean(r["ideal"] for r in part)
        lines.append(f"| {name} | {batch} | {len(part)} {kernel}x{kernel} DGC layers | {masked:.2f} | {gathered:.2f} | "
                     f"{static:.2f} | {masked / gathered:.2f}x | {ideal:.2f}x | {masked / gathered / ideal:.2f} |")
    lines.append(f"| {name} | {batch} | whole network | {network['masked']:.2f} | {network['engine']:.2f} | | "
                 f"{network['masked'] / network['engine']:.2f}x | | |")
    return lines


def main(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME:RESOLUTION")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", help="every layer's row, at full precision")
    args = p.parse_args(argv)
    models = []
    for item in args.models:
        name, _, resolution = item.partition(":")
        if not resolution.isdigit() or name not in ("dydensenet86", "dydensenet", "dyresnet18"):
            p.error(f"--models takes DGC models as NAME:RESOLUTION (e.g. dydensenet86:32), got {item}")
        models.append((name, int(resolution)))
    if min(args.batch_sizes) < 1 or args.runs < 1 or args.warmup < 0:
        p.error("--batch-sizes and --runs must be positive, --warmup at least 0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; times in ms (medians)")
    print("| model | batch | layers | masked | gathered | static group conv | achieved | ideal | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_rows = []
    for name, resolution in models:
        model = pruned_model(name, resolution)
        engine = SparseEngine(model)
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
            rows = [dict(model=name, batch=batch, **layer_row(layer, x, args.runs, args.warmup))
                    for layer, x in layer_inputs(model, images).items()]
            with torch.no_grad():
                network = median_ms({"masked": lambda: model(images), "engine": lambda: engine(images)}, args.runs,
                                    args.warmup)
            print("\n".join(summary(name, batch, rows, network)), flush=True)
            all_rows += rows
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
