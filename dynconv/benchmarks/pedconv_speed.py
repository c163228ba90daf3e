"""Inference speed of PEDConv against the static network: a PEDConv ResNet (default pedconv_resnet18) on each of
its exact evaluation paths (per_image, the default: channel attention on the maps and a tap-scaled W per image;
static: static W on scaled neighbourhoods; grouped, the paper's: every image's full kernel, one conv with a group
per image) against the static ResNet of the same name without the prefix, at each batch size. Median times over
--runs alternated runs after --warmup, eval mode, random weights (speed does not depend on them), channels-last
inputs; the MMac of each variant as the counter gives it. Prints a markdown table.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as dynconv/benchmarks/speedtest.py: spinning OpenMP workers

import torch  # noqa: E402

from dynconv import count_mmac  # noqa: E402
from dynconv.models import build_model, list_models  # noqa: E402
from dynconv.models.pedconv import INFERENCE_PATHS  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser  # noqa: E402
from dynconv.utils.errors import run_cli  # noqa: E402
from dynconv.utils.timing import median_ms  # noqa: E402

EXAMPLES = """examples:
  python -m dynconv.benchmarks.pedconv_speed                         # batch 1 and 32 at 224x224
  python -m dynconv.benchmarks.pedconv_speed --batch-sizes 8 --resolution 112 --runs 3
  python -m dynconv.benchmarks.pedconv_speed --model pedconv_resnet32 --resolution 32 --batch-sizes 1 256
"""
MODELS = [name for name in list_models() if name.startswith("pedconv_")]


def speedtest_argv(name, resolution, batch_sizes, runs, warmup):
    """This benchmark's arguments for one model of dynconv/benchmarks/speedtest.py's --models."""
    return ["--model", name, "--resolution", str(resolution), "--batch-sizes", *map(str, batch_sizes),
            "--runs", str(runs), "--warmup", str(warmup)]


def variants(name):
    """{name: model in eval mode}: the static ResNet and the PEDConv ResNet on each evaluation path."""
    torch.manual_seed(0)
    static = name.removeprefix("pedconv_")
    out = {f"{static} (static)": build_model(static)}
    for path in INFERENCE_PATHS:
        out[f"{name}, {path} path"] = build_model(name, options={"inference": path})
    return {label: m.eval().to(memory_format=torch.channels_last) for label, m in out.items()}


def main(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--model", default="pedconv_resnet18", choices=MODELS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.runs < 1 or args.warmup < 0 or args.resolution < 32 or (args.threads or 1) < 1:
        p.error("--batch-sizes, --runs and --threads must be positive, --warmup at least 0, --resolution at least 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = variants(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, {args.resolution}x{args.resolution}; times in ms (medians)")
    print("| batch | model | MMac per image | ms | x static |")
    print("|---|---|---|---|---|")
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.resolution, args.resolution).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            times = median_ms({name: (lambda m=model: m(x)) for name, model in models.items()}, args.runs,
                              args.warmup)
            mmac = {name: count_mmac(model, x[:1]) for name, model in models.items()}
        static = next(iter(times.values()))  # the static model comes first
        for name in models:
            ms = times[name]
            print(f"| {batch} | {name} | {mmac[name]:.3f} | {ms:.1f} | {ms / static:.2f}x |", flush=True)


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
