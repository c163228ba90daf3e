"""Evaluate the CIFAR-10 reproduction runs, ship their best checkpoints, and tabulate/plot the results.

For every run directory: evaluates checkpoint_best.pth with exactly the command the README shows (main_cifar.py's
own run, or main_imagenet.py's at the run's --resolution for ImageNet-family models trained on the CIFAR-10
image folders, e.g. ConvNeXt at 64x64; the returned metrics are the numbers it prints), optionally strips the
checkpoint to what evaluation needs (--strip: weights and metadata, no optimizer/scheduler state), then writes one
JSON line per run to --results and prints the README's markdown table. The plot is drawn from the JSON lines. The default --results
lies outside the tracked tree; replacing a results file that git tracks (the README's exp/cifar/results.jsonl)
takes both --results FILE and --overwrite. Every flag and path is checked before anything is evaluated.
"""
import contextlib
import json
import os
import subprocess
import sys

import torch

from dynconv.apps import cifar as main_cifar  # noqa: E402
from dynconv.apps import imagenet as main_imagenet  # noqa: E402
from dynconv import count_parameters  # noqa: E402
from dynconv.models import build_model, list_models, model_config, model_family  # noqa: E402
from dynconv.utils.checkpoint import BEST, load_checkpoint, save_checkpoint, stripped  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser  # noqa: E402
from dynconv.utils.data import CIFAR_SIZE  # noqa: E402
from dynconv.utils.errors import UserError, run_cli  # noqa: E402
from dynconv.utils.plot import model_name, plot_accuracy_vs_macs  # noqa: E402

# what evaluation needs; a multi-target run's per-budget metrics and its tied-norms choice (it fixes the model)
KEEP = ("state_dict", "epoch", "best_prec1", "prec1", "mmac", "args", "version", "budget_metrics", "tied_norms")
DEFAULT_RESULTS = os.path.join("runs", "cifar_results.jsonl")

EXAMPLES = """examples:
  # evaluate new runs, strip their checkpoints for shipping (results: runs/cifar_results.jsonl)
  python -m dynconv.scripts.cifar_results runs/cifar/*/* --data data/cifar10-jpeg --strip
  # the README's table and plot from the shipped checkpoints (replaces the tracked results file)
  python -m dynconv.scripts.cifar_results exp/cifar/*/* --data data/cifar10-jpeg --results exp/cifar/results.jsonl \\
      --overwrite --plot docs/cifar_accuracy_vs_mmac.png
  # the ConvNeXt runs at 64x64 (main_imagenet.py), plotted with the ResNets
  python -m dynconv.scripts.cifar_results exp/cifar64/*/* --data data/cifar10-jpeg --results exp/cifar64/results.jsonl \\
      --overwrite --plot docs/cifar_accuracy_vs_mmac.png --plot_also exp/cifar/results.jsonl
"""


ENTRY = {"cifar": main_cifar, "imagenet": main_imagenet}  # the entry script of each model family


def checkpoint_path(run):
    """A run directory's checkpoint_best.pth, or the checkpoint file itself."""
    return run if os.path.isfile(run) else os.path.join(run, BEST)


def evaluate_command(run, args, data, budget=None, resolution=None):
    """The README's evaluation command of a run (a run directory or a checkpoint); `budget`: one budget of a
    multi-target run (without it the command evaluates every budget); `resolution`: an input size other than the
    run's own."""
    family = model_family(args["model"])
    resolution = resolution or args.get("resolution")
    shown = family == "imagenet" or resolution not in (None, CIFAR_SIZE)
    if args.get("budget_targets"):
        chosen = [] if budget is None else ["--budget", f"{budget:g}"]
    else:
        chosen = ["--budget", f"{args.get('budget', -1):g}"]
    return (["--model", args["model"], *chosen, "-r", checkpoint_path(run), "-e", "--data", data]
            + (["--resolution", str(resolution)] if shown else []))


def evaluate(run, args, data, workers, fast=False, resolution=None):
    """The entry script's own evaluation (its printed lines go to stderr, stdout keeps the table), as result_rows.
    With `fast`, also the images/s of the masked model and of the sparse engine (-e --fast); `resolution`: at an
    input size other than the run's own (the rows say `varied: resolution`)."""
    family = model_family(args["model"])
    argv = (evaluate_command(run, args, data, resolution=resolution) + ["--workers", str(workers)]
            + (["--fast"] if fast else []))
    with contextlib.redirect_stdout(sys.stderr):
        metrics = ENTRY[family].main(argv)
    rows = result_rows(run, args, data, metrics, resolution)
    return [{**r, "varied": "resolution"} for r in rows] if resolution else rows


def model_variant(args):
    """The model options a run changed from its model's defaults, e.g. "gate_factor=1" ("" when none): tables and
    plots name the model with them."""
    def plain(value):
        return tuple(value) if isinstance(value, list) else value

    options = model_config(args["model"]).options
    changed = {k: v for k, v in (args.get("model_kwargs") or {}).items()
               if k in options and plain(v) != plain(options[k][0])}
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())


def stored_metrics(checkpoint):
    """The metrics a training run stored with its checkpoint (its evaluation on the validation set after that
    epoch), in run()'s shape; None when it stored none (e.g. an upstream checkpoint)."""
    if "prec1" not in checkpoint or "mmac" not in checkpoint:
        return None
    epoch = int(checkpoint.get("epoch", 0))
    targets = {float(b): {**m, "epoch": epoch} for b, m in (checkpoint.get("budget_metrics") or {}).items()}
    return {"epoch": epoch, "prec1": checkpoint["prec1"], "mmac": checkpoint["mmac"],
            **({"targets": targets} if targets else {})}


def result_rows(run, args, data, metrics, resolution=None):
    """Results rows of a run's metrics (run()'s, or stored_metrics), rounded as the entry scripts print them: one
    row, or one per budget of a multi-target run (`targets`: its budgets, drawn as one curve). `arch`: the network
    type, one dense curve each in the plot; `epochs`: the length of its training schedule (runs of two schedules
    are two curves)."""
    family, targets = model_family(args["model"]), list(args.get("budget_targets") or [])
    model = trained_model(args, targets)
    resolution = resolution or args.get("resolution") or CIFAR_SIZE
    arch = type(model).__name__.replace("Cifar", "") + (f" {resolution}x{resolution}" if family == "imagenet"
                                                         else "")
    method = model_config(args["model"]).method
    variant = model_variant(args)
    common = {"run": run, "model": args["model"], "params": count_parameters(model), "arch": arch,
              "resolution": resolution, **({"epochs": args["epochs"]} if args.get("epochs") else {}),
              **({"method": method} if method else {}),
              **({"variant": variant} if variant else {})}
    per_budget = metrics["targets"].items() if targets else [(args.get("budget", -1), metrics)]
    return [{**common, "budget": budget, **({"targets": targets} if targets else {}),
             "epoch": int(m["epoch"]), "prec1": round(float(m["prec1"]), 3), "mmac": round(float(m["mmac"]), 6),
             **_speeds(m), "command": f"python main_{family}.py "
             + " ".join(evaluate_command(run, args, data, budget if targets else None, resolution))}
            for budget, m in per_budget]


def trained_model(args, targets):
    """A fresh model of the run's architecture (for its parameter count and type), its norms tied across the
    budgets as it was trained (a multi-target run from pretrained weights)."""
    return build_model(args["model"], 10, spatial_gates=args.get("budget", -1) >= 0, targets=targets,
                       options=args.get("model_kwargs"), tied_norms=bool(args.get("tied_norms")))


def _speeds(metrics):
    """-e --fast's images/s of the masked model and the engine, when measured."""
    if "reference_images_per_s" not in metrics:
        return {}
    return {"masked_images_per_s": round(float(metrics["reference_images_per_s"]), 1),
            "engine_images_per_s": round(float(metrics["images_per_s"]), 1)}


def row_order(row):
    """Tables list rows by network type, then model (resnet8 before resnet20), single-budget before multi-target,
    budget, input size, schedule length."""
    return (row.get("arch", ""), len(row["model"]), row["model"], bool(row.get("targets")), row["budget"],
            row.get("resolution", 0), row.get("epochs", 0))


def budget_label(row):
    """"dense", a budget, or a multi-target run's budget as "0.25 (multi)"."""
    return "dense" if row["budget"] < 0 else f"{row['budget']:g}" + (" (multi)" if row.get("targets") else "")


def markdown_table(rows):
    """The README's table; a multi-target run's budgets read "0.25 (multi)", a model of another method (its
    config's `method`, no budget) reads its method's name; with speeds when measured."""
    speed = any("engine_images_per_s" in r for r in rows)
    lines = ["| model | budget | Prec@1 (%) | MMac per image | parameters |"
             + (" images/s masked / engine |" if speed else "") + " evaluate with |",
             "|---|---|---|---|---|" + ("---|" if speed else "") + "---|"]
    for r in rows:
        budget = r.get("method") or budget_label(r)
        speeds = (f" {r['masked_images_per_s']:.0f} / {r['engine_images_per_s']:.0f} |" if "engine_images_per_s" in r
                  else " |") if speed else ""
        lines.append(f"| {model_name(r)} | {budget} | {r['prec1']:.3f} | {r['mmac']:.6f} | {r['params']:,} |{speeds} "
                     f"`{r['command']}` |")
    return "\n".join(lines)


def tracked_by_git(path):
    """Whether git tracks `path` (False outside a git checkout or without git)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        done = subprocess.run(["git", "-C", folder, "ls-files", "--error-unmatch", os.path.basename(path)],
                              capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("runs", nargs="+", help="run directories holding checkpoint_best.pth")
    p.add_argument("--data", default="data/cifar10-jpeg", help="CIFAR-10 root (image folders or torchvision's)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--strip", action="store_true",
                   help="rewrite checkpoint_best.pth without optimizer state (float16 weights when float32 would "
                        "be over 10 MB), then evaluate that file")
    p.add_argument("--fast", action="store_true",
                   help="evaluate with -e --fast: also images/s of the masked model and of the sparse engine")
    p.add_argument("--results", help=f"JSON lines written here (default: {DEFAULT_RESULTS}, its folder created)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --results: replace that file even when git tracks it")
    p.add_argument("--plot", help="PNG of Prec@1 against MMac drawn from the results")
    p.add_argument("--plot_also", nargs="*", default=[], metavar="RESULTS",
                   help="with --plot: the rows of these results files too (e.g. exp/cifar/results.jsonl)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Flags and paths, before anything is evaluated: one line each (p.error exits with code 2)."""
    missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, BEST))]
    if missing:
        p.error(f"no {BEST} in {', '.join(missing)} (each argument is a run directory)")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data} does not exist")
    if args.workers < 0:
        p.error(f"--workers must be at least 0, got {args.workers}")
    explicit, args.results = args.results is not None, args.results or DEFAULT_RESULTS
    if os.path.exists(args.results) and tracked_by_git(args.results) and not (explicit and args.overwrite):
        p.error(f"{args.results} is tracked by git: to replace it pass --results {args.results} --overwrite")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        p.error(f"--plot {args.plot}: the folder {os.path.dirname(args.plot)} does not exist")
    missing = [f for f in args.plot_also if not os.path.isfile(f)]
    if missing or (args.plot_also and not args.plot):
        p.error(f"--plot_also {' '.join(missing)} does not exist" if missing else "--plot_also goes with --plot")


def training_args(run):
    """The checkpoint's model and budget (the entry scripts save their flags), checked before any evaluation."""
    path = checkpoint_path(run)
    args = load_checkpoint(path).get("args") or {}
    if args.get("model") not in list_models() or not isinstance(args.get("budget", -1), (int, float)):
        raise UserError(f"{path} names no model and budget in its 'args': not a main_cifar.py or main_imagenet.py "
                        "checkpoint")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = {run_dir: training_args(run_dir) for run_dir in sorted(set(args.runs))}
    rows = []
    for run_dir, train_args in runs.items():
        if args.strip:  # first: the rows are evaluated from the file as shipped (float16 where it is stored so)
            path = os.path.join(run_dir, BEST)
            save_checkpoint(stripped(load_checkpoint(path), KEEP), path)
        for row in evaluate(run_dir, train_args, args.data, args.workers, args.fast):
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    rows.sort(key=row_order)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))
    if args.plot:
        plot_accuracy_vs_macs([args.results] + args.plot_also, args.plot)
        print(f"=> plot written to {args.plot}", file=sys.stderr)


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_cli(main)


if __name__ == "__main__":
    cli()
