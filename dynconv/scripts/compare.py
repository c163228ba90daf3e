"""One comparison of every method: Prec@1 against MMac per image and against latency measured on this machine,
from finished runs of any family (dense ResNets, DynConv at one budget or multi-target, ConvNeXt, DGC, PEDConv).

For every run directory (its checkpoint_best.pth) or checkpoint file:
- accuracy and MMac: the metrics the training run stored with the checkpoint (its evaluation of that epoch on the
  validation set, the command's numbers), else (or with --evaluate) the entry script's own evaluation, through the
  metrics run() returns (dynconv/scripts/cifar_results.py's evaluate);
- latency: the model's own forward (for DynConv the masked-dense model) and, where the model has one, the sparse
  engine's fast path (SparseEngine: DynConv's spatial masks, DGC's channel gather), on evaluation images at batch 1
  and a larger batch; every path of every run alternated run by run (a slow phase of the machine hits all alike),
  the median kept; threads and OpenMP wait policy printed and stored;
- for dynamic models (DynConv, another method), the gap in Prec@1 to the dense curve of their network type and
  schedule at their MMac (add_dense_gaps: the paper's claim at equal MACs, answered per run), and at their
  latency per batch size (the fastest path of each, dense models included: is it faster than a dense network
  of its accuracy?);
- for dense models, ptflops' module-level count as a cross-check, beside ours under the same conventions
  (count_mmac(full=True): BN, ReLU, pooling and every Linear counted too, so both read above the MMac column).
--resolutions adds the course-reproduction mode: the CIFAR dense and DynConv models evaluated at other input
sizes (MMac follow the input size), drawn as curves of their own, a different axis of variation than budgets.
Writes OUT/compare.jsonl, OUT/compare.md (the table, also printed), OUT/accuracy_vs_mmac.png and one
OUT/accuracy_vs_latency_bN.png per batch size.
"""
import contextlib
import io
import json
import math
import os
import platform
import sys

# OpenMP workers spin between parallel regions (the usual CPU latency setting, as dynconv/benchmarks/speedtest.py); read
# when torch loads OpenMP, hence before the import
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dynconv.scripts import cifar_results  # noqa: E402
from dynconv.scripts.cifar_results import (ENTRY, budget_label, checkpoint_path, evaluate, evaluate_command, result_rows,  # noqa: E402
                           row_order, stored_metrics)
from dynconv import count_mmac  # noqa: E402
from dynconv.models import model_family  # noqa: E402
from dynconv.utils.checkpoint import load_checkpoint  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser, parse  # noqa: E402
from dynconv.utils.data import first_images  # noqa: E402
from dynconv.utils.errors import run_cli  # noqa: E402
from dynconv.utils.logger import read_jsonl  # noqa: E402
from dynconv.utils.plot import comparison_figure, model_name, row_family  # noqa: E402
from dynconv.utils.run import restore_model  # noqa: E402
from dynconv.utils.settings import decides  # noqa: E402
from dynconv.utils.timing import median_ms  # noqa: E402

MMAC_CAPTION = ("MMac: multiply-accumulates per image that our implementation executes at inference (convolutions "
                "at the positions / channels they run at, gates, generators, linears; norms, activations and "
                "pooling not counted): one definition for every method.")
EXAMPLES = """examples:
  # every shipped CIFAR-10 run: table, JSON lines and plots in runs/compare
  python -m dynconv.scripts.compare exp/cifar/*/* exp/cifar64/*/* --data data/cifar10-jpeg
  # also the dense and DynConv ResNets at other input sizes, latency at batch 1 and 128
  python -m dynconv.scripts.compare exp/cifar/resnet32/* --data data/cifar10-jpeg --resolutions 24 40 --batch-sizes 1 128
"""


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("runs", nargs="+", help="run directories (their checkpoint_best.pth) or checkpoint files")
    p.add_argument("--data", default="data/cifar10-jpeg", help="CIFAR-10 root (image folders or torchvision's)")
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="folder for the table, JSON lines, plots")
    p.add_argument("--results_in", nargs="*", default=[], metavar="RESULTS",
                   help="also the rows of these results files (dynconv/scripts/cifar_results.py's) for runs whose checkpoints "
                        "are not here (e.g. exp/cifar64/results.jsonl): plotted by MMac, no latency")
    p.add_argument("--evaluate", action="store_true", help="evaluate every run, also those with stored metrics")
    p.add_argument("--resolutions", type=int, nargs="*", default=[], metavar="R",
                   help="also evaluate the CIFAR dense and DynConv models at these input sizes")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batch sizes")
    p.add_argument("--runs-per-path", type=int, default=10, dest="timed_runs", help="timed runs per path (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per path first")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count(), help="torch intra-op threads (default: every core this process may use, as "
                   "the README's tables; not OMP_NUM_THREADS)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes for evaluations")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not os.path.isfile(checkpoint_path(r))]
    missing_results = [f for f in args.results_in if not os.path.isfile(f)]
    problems = [(missing, f"no checkpoint at {', '.join(missing)} (a run directory needs checkpoint_best.pth)"),
                (missing_results, f"--results_in {' '.join(missing_results)} does not exist"),
                (not os.path.isdir(args.data), f"--data {args.data} does not exist"),
                (min(args.batch_sizes) < 1 or args.timed_runs < 1 or args.warmup < 0 or args.threads < 1,
                 "--batch-sizes, --runs-per-path and --threads must be positive, --warmup at least 0"),
                (any(r < 8 for r in args.resolutions), "--resolutions must be at least 8 pixels"),
                (args.workers < 0, "--workers must be at least 0")]
    for bad, message in problems:
        if bad:
            p.error(message)
    return args


def accuracy_rows(run, train_args, args):
    """The run's result rows (one per budget of a multi-target run): stored metrics, else its evaluation; then
    one evaluation per extra input size of a CIFAR dense or DynConv model."""
    stored = None if args.evaluate else stored_metrics(load_checkpoint(checkpoint_path(run)))
    if stored is None:
        rows = [{**r, "source": "evaluated"} for r in evaluate(run, train_args, args.data, args.workers)]
    else:
        rows = [{**r, "source": "stored"} for r in result_rows(run, train_args, args.data, stored)]
    varies = model_family(train_args["model"]) == "cifar" and not any(r.get("method") or r.get("targets")
                                                                      for r in rows)
    for resolution in args.resolutions if varies else []:
        rows += [{**r, "source": "evaluated"} for r in evaluate(run, train_args, args.data, args.workers,
                                                                resolution=resolution)]
    return rows


def load_model(row, train_args, data):
    """The row's trained model (eval mode, channels-last) as the entry script builds it, its validation set, and
    whether it has a sparse-engine fast path."""
    family = model_family(train_args["model"])
    argv = evaluate_command(row["run"], train_args, data, resolution=row["resolution"])
    flags, explicit = parse(ENTRY[family].make_parser(), argv)
    with contextlib.redirect_stdout(sys.stderr):
        model, val_set, settings = restore_model(flags, family, ENTRY[family].datasets, explicit)
    return model, val_set, decides(settings).gated  # the reconciled settings: the checkpoint's model and budget


def timed_paths(rows, runs_args, data, batch_sizes):
    """{batch: {(row index, path): callable}}: each row's model forward ("model") and fast path ("fast"), on
    the first evaluation images of its resolution (repeated up to the batch size); also each dense row's
    ptflops count and ours under its conventions (row["ptflops_mmac"], row["full_mmac"])."""
    from dynconv.sparse.engine import SparseEngine

    loaded, paths = {}, {b: {} for b in batch_sizes}
    for i, row in enumerate(rows):
        key = (row["run"], row["resolution"])
        if key not in loaded:
            model, val_set, fast = load_model(row, runs_args[row["run"]], data)
            images = first_images(val_set, max(batch_sizes))[0].contiguous(memory_format=torch.channels_last)
            loaded[key] = model, SparseEngine(model) if fast else None, images
        model, engine, images = loaded[key]
        kwargs = {"target": row["budget"]} if row.get("targets") else {}
        if row["budget"] < 0 and not (row.get("method") or row.get("targets")):  # a static network
            row["ptflops_mmac"] = ptflops_mmac(model, images.shape[1:])
            row["full_mmac"] = round(count_mmac(model, images[:1], full=True), 6)
        for b in batch_sizes:
            x = images.repeat((b + len(images) - 1) // len(images), 1, 1, 1)[:b]
            paths[b][i, "model"] = lambda m=model, x=x, kw=kwargs: m(x, **kw)
            if engine is not None:
                paths[b][i, "fast"] = lambda e=engine, x=x, kw=kwargs: e(x, **kw)
    return paths


def ptflops_mmac(model, shape):
    """ptflops' MMac of one image (its pytorch backend, modules only: functional calls such as the residual sum are
    not counted, as in ours), its printing silenced."""
    import ptflops

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = ptflops.get_model_complexity_info(model, tuple(shape), as_strings=False, print_per_layer_stat=False,
                                                    backend="pytorch",
                                                    backend_specific_config={"count_functional": False})
    return round(macs / 1e6, 6)


def measure_latency(rows, runs_args, args):
    """Adds `latency_ms` ({batch: {path: median ms}}) and the timing setup to every row."""
    setup = {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu": cpu_name(),
             "runs": args.timed_runs, "warmup": args.warmup}
    print("=> latency: " + ", ".join(f"{k} {v}" for k, v in setup.items()), file=sys.stderr)
    paths = timed_paths(rows, runs_args, args.data, args.batch_sizes)
    for row in rows:
        row["latency_ms"], row["timing"] = {}, setup
    with torch.inference_mode():
        for batch, fns in paths.items():
            for (i, path), ms in median_ms(fns, args.timed_runs, args.warmup).items():
                rows[i]["latency_ms"].setdefault(str(batch), {})[path] = round(ms, 3)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def dense_curve_key(row):
    """What a row's dense reference curve shares with it: network type, schedule length, input size."""
    return row.get("arch", "ResNet"), row.get("epochs"), row["resolution"]


def add_dense_gaps(rows):
    """Adds `vs_dense` to every dynamic row: its Prec@1 minus the dense curve's at its MMac, in points, or None
    where no dense models of its network type, schedule and input size lie on both sides of it. The dense curve
    is the straight line between the two neighbouring dense models (linear in MMac). Accuracy grows concavely with
    MACs (as across the shipped dense ResNets), so the chord lies at or below the dense networks one could build in
    between: a model below it is below the dense curve for certain; for one above it the gap is an upper bound of
    its lead at equal MACs (the paper's claim), the tighter the closer the dense models lie.
    Also `vs_dense_latency` ({batch: points or None}) for rows timed here: the same against the dense curve at
    equal latency (each model's fastest path, the chord linear in milliseconds), the speed question the MACs
    stand in for. Where a model lies left of a curve (fewer MACs or less time than every dense network) and above
    its first point, `vs_dense_lower_bound` / `vs_dense_latency_lower_bound` ({batch: points}) hold its lead over
    that dense network: a lower bound of its gap, as a dense network with less would not be more accurate."""
    curves = {}
    for r in rows:
        if dense(r) and not r.get("varied"):
            curves.setdefault(dense_curve_key(r), []).append((r["mmac"], r["prec1"]))
            for b in r.get("latency_ms", {}):
                curves.setdefault((dense_curve_key(r), b), []).append((fastest_ms(r, b), r["prec1"]))
    for r in rows:
        if dense(r):
            continue
        curve = curves.get(dense_curve_key(r))
        r["vs_dense"] = chord_gap(r["mmac"], r["prec1"], curve)
        r["vs_dense_latency"] = {b: chord_gap(fastest_ms(r, b), r["prec1"], curves.get((dense_curve_key(r), b)))
                                 for b in r.get("latency_ms", {})}
        bound = lead_left_of(r["mmac"], r["prec1"], curve)
        if bound is not None:
            r["vs_dense_lower_bound"] = bound
        bounds = {b: lead_left_of(fastest_ms(r, b), r["prec1"], curves.get((dense_curve_key(r), b)))
                  for b in r.get("latency_ms", {})}
        if any(v is not None for v in bounds.values()):
            r["vs_dense_latency_lower_bound"] = {b: v for b, v in bounds.items() if v is not None}


def chord_gap(x, prec1, curve):
    """prec1 minus the curve's Prec@1 at x (points, 2 decimals), the curve the chords between its (x, Prec@1)
    points; None outside the curve or without one."""
    if x is None or not curve:
        return None
    xs, ys = zip(*sorted(curve))
    at_x = float(np.interp(x, xs, ys, left=math.nan, right=math.nan))
    return None if math.isnan(at_x) else round(prec1 - at_x, 2)


def lead_left_of(x, prec1, curve):
    """prec1 minus the curve's first Prec@1 (points, 2 decimals) where x lies left of the curve and prec1 above that
    point; else None."""
    if x is None or not curve:
        return None
    first_x, first_prec1 = min(curve)
    return round(prec1 - first_prec1, 2) if x < first_x and prec1 > first_prec1 else None


def dense(row):
    """A dense network of our own (no gates, no other method): a point of the reference curve."""
    return row["budget"] < 0 and not row.get("method")


def fastest_ms(row, batch):
    """The row's fastest exact path at `batch` (the paths compute the same function), or None."""
    times = row.get("latency_ms", {}).get(str(batch))
    return min(times.values()) if times else None


def markdown_table(rows, batch_sizes):
    """Family, model, budget, input size, training epochs, Prec@1, its gap to the dense curve at equal MMac and at
    equal latency per batch size, MMac, ptflops / our full count (dense), parameters, latency per batch size (model
    forward / fast path), where the accuracy came from."""
    head = ["family", "model", "budget", "input", "epochs", "Prec@1 (%)", "vs dense at equal MMac",
            *(f"vs dense at equal ms b{b}" for b in batch_sizes), "MMac",
            "full count: ptflops / ours",
            "parameters"] + [f"ms b{b} model / fast" for b in batch_sizes] + ["from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        budget = "-" if r.get("method") else budget_label(r)
        latency = [" / ".join(f"{r['latency_ms'][str(b)][p]:.2f}" if p in r["latency_ms"].get(str(b), {}) else "-"
                              for p in ("model", "fast")) for b in batch_sizes]
        full = f"{r['ptflops_mmac']:.3f} / {r['full_mmac']:.3f}" if "ptflops_mmac" in r else ""
        gaps = [r.get("vs_dense")] + [r.get("vs_dense_latency", {}).get(str(b)) for b in batch_sizes]
        bounds = [r.get("vs_dense_lower_bound")] + [r.get("vs_dense_latency_lower_bound", {}).get(str(b))
                                                    for b in batch_sizes]
        gaps = [f"{g:+.2f}" if g is not None else f">= {bound:+.2f}" if bound is not None else ""
                for g, bound in zip(gaps, bounds)]
        cells = [row_family(r), model_name(r), budget, f"{r['resolution']}px", str(r.get("epochs", "")),
                 f"{r['prec1']:.2f}", *gaps, f"{r['mmac']:.3f}", full, f"{r['params']:,}", *latency, r["source"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plots(rows, args):
    """OUT/accuracy_vs_mmac.png and OUT/accuracy_vs_latency_bN.png; returns their paths."""
    written = [os.path.join(args.out, "accuracy_vs_mmac.png")]
    comparison_figure(rows, caption=MMAC_CAPTION).savefig(written[0], dpi=110)
    timing = rows[0]["timing"]
    for b in args.batch_sizes:
        caption = (f"Latency: median of {timing['runs']} alternated runs after {timing['warmup']} warm-up, batch {b}, "
                   f"{timing['threads']} threads (OMP_WAIT_POLICY={timing['omp_wait_policy']}), {timing['cpu']}; "
                   "the fastest exact path of each model (its forward or the sparse engine).")
        written.append(os.path.join(args.out, f"accuracy_vs_latency_b{b}.png"))
        comparison_figure(rows, x=lambda r, b=b: fastest_ms(r, b), xlabel=f"ms per batch of {b}",
                          title=f"CIFAR-10: Prec@1 against measured latency (batch {b})",
                          caption=caption, log_x=True).savefig(written[-1], dpi=110)
    return written


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs_args = {run: cifar_results.training_args(run) for run in dict.fromkeys(args.runs)}
    rows = sorted((row for run, train_args in runs_args.items() for row in accuracy_rows(run, train_args, args)),
                  key=row_order)
    measure_latency(rows, runs_args, args)
    measured = {(r["run"], r["budget"]) for r in rows}
    rows += sorted(({**r, "source": "results file", "latency_ms": {}} for path in args.results_in
                    for r in read_jsonl(path) if (r["run"], r["budget"]) not in measured), key=row_order)
    add_dense_gaps(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    table = markdown_table(rows, args.batch_sizes)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    for path in write_plots(rows, args):
        print(f"=> {path}", file=sys.stderr)
    return rows


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
