"""Evaluate the CIFAR-10 reproduction runs, ship their best checkpoints, and tabulate/plot the results.

    python scripts/cifar_results.py exp/cifar/*/* --data data/cifar10-jpeg --strip \
        --results exp/cifar/results.jsonl --plot docs/cifar_accuracy_vs_mmac.png

For every run directory: evaluates checkpoint_best.pth with exactly the command the README shows (main_cifar.py's
own run, whose returned metrics are the numbers it prints), optionally strips the
checkpoint to what evaluation needs (--strip: weights and metadata, no optimizer/scheduler state), then
writes one JSON line per run and prints the README's markdown table. The plot is drawn from the JSON lines.
"""
import argparse
import contextlib
import io
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_cifar  # noqa: E402
from dynconv import MaskUnit, count_parameters  # noqa: E402
from models import create_model  # noqa: E402
from utils.checkpoint import BEST, load_checkpoint, save_checkpoint  # noqa: E402
from utils.plot import plot_accuracy_vs_macs  # noqa: E402

KEEP = ("state_dict", "epoch", "best_prec1", "prec1", "mmac", "args", "version")


def evaluate_command(run_dir, args, data):
    budget = args["budget"]
    return ["--model", args["model"], "--budget", f"{budget:g}", "-r", os.path.join(run_dir, BEST), "-e",
            "--data", data]


def evaluate(run_dir, data, workers):
    checkpoint = load_checkpoint(os.path.join(run_dir, BEST))
    args = checkpoint["args"]
    argv = evaluate_command(run_dir, args, data) + ["--workers", str(workers)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main_cifar.main(argv)
    text = out.getvalue()
    epoch, prec1 = re.search(r"^\* Epoch (\d+) - Prec@1 (\S+)$", text, re.M).groups()
    mmac = re.search(r"^\* FLOPS \(multiply-accumulates, MACs\) per image:  (\S+) MMac$", text, re.M).group(1)
    model = create_model(args["model"], "cifar", sparse=args["budget"] >= 0)
    return checkpoint, {"run": run_dir, "model": args["model"], "budget": args["budget"], "epoch": int(epoch),
                        "prec1": float(prec1), "mmac": float(mmac), "params": count_parameters(model),
                        "command": "python main_cifar.py " + " ".join(evaluate_command(run_dir, args, data))}


def markdown_table(rows):
    lines = ["| model | budget | Prec@1 (%) | MMac per image | parameters | evaluate with |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        budget = "dense" if r["budget"] < 0 else f"{r['budget']:g}"
        lines.append(f"| {r['model']} | {budget} | {r['prec1']:.3f} | {r['mmac']:.6f} | {r['params']:,} | "
                     f"`{r['command']}` |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories holding checkpoint_best.pth")
    p.add_argument("--data", default="data/cifar10-jpeg")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--strip", action="store_true", help="rewrite checkpoint_best.pth without optimizer state")
    p.add_argument("--results", default="exp/cifar/results.jsonl")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    rows = []
    for run_dir in sorted(r for r in args.runs if os.path.isfile(os.path.join(r, BEST))):
        checkpoint, row = evaluate(run_dir, args.data, args.workers)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if args.strip:
            save_checkpoint({k: checkpoint[k] for k in KEEP if k in checkpoint}, os.path.join(run_dir, BEST))
    rows.sort(key=lambda r: (int(r["model"][len("resnet"):]), r["budget"]))
    with open(args.results, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))
    if args.plot:
        plot_accuracy_vs_macs(args.results, args.plot)
        print(f"=> plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
