"""Inference speed of PEDConv against the static network: pedconv_resnet18 on its static-weight path (no per-image
kernel; the default) and on the paper's grouped path (a kernel per image, one conv with a group per image), against
the static ResNet-18 with the same layout, at each batch size. Median times over --runs alternated runs after
--warmup, eval mode, random weights (speed does not depend on them), channels-last inputs; the MMac of each
variant as the counter gives it. Prints a markdown table.
"""
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as benchmarks/speedtest.py: spinning OpenMP workers

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dynconv import count_mmac  # noqa: E402
from models import create_model  # noqa: E402
from utils.cli import OneLineErrorParser  # noqa: E402
from utils.errors import run_cli  # noqa: E402

EXAMPLES = """examples:
  python benchmarks/pedconv_speed.py                         # batch 1 and 32 at 224x224
  python benchmarks/pedconv_speed.py --batch-sizes 8 --resolution 112 --runs 3
"""


def variants():
    """{name: model in eval mode}: the static ResNet-18 and pedconv_resnet18 on each evaluation path."""
    torch.manual_seed(0)
    out = {"resnet18 (static)": create_model("resnet18")}
    for path in ("static", "grouped"):
        out[f"pedconv_resnet18, {path} path"] = create_model("pedconv_resnet18", inference=path)
    return {name: m.eval().to(memory_format=torch.channels_last) for name, m in out.items()}


def main(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.runs < 1 or args.warmup < 0 or args.resolution < 32:
        p.error("--batch-sizes and --runs must be positive, --warmup at least 0, --resolution at least 32")
    models = variants()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}, {args.resolution}x{args.resolution}; times in ms (medians)")
    print("| batch | model | MMac per image | ms | x static |")
    print("|---|---|---|---|---|")
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.resolution, args.resolution).contiguous(memory_format=torch.channels_last)
        times = {name: [] for name in models}
        with torch.no_grad():
            for i in range(args.warmup + args.runs):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    if i >= args.warmup:
                        times[name].append((time.perf_counter() - start) * 1e3)
            mmac = {name: count_mmac(model, x[:1]) for name, model in models.items()}
        static = statistics.median(times["resnet18 (static)"])
        for name in models:
            ms = statistics.median(times[name])
            print(f"| {batch} | {name} | {mmac[name]:.3f} | {ms:.1f} | {ms / static:.2f}x |", flush=True)


if __name__ == "__main__":
    run_cli(main)
