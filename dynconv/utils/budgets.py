"""Multi-target (budget-aware) runs: the budgets a run trains or evaluates, their Prec@1 targets, and the
flag checks that concern them. The model side is dynconv/multitarget.py."""
import csv
import os

DEFAULT_TARGETS_CSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "performance_targets.csv")


def run_targets(args):
    """The budgets of a multi-target run, as a tuple (empty for single-budget and dense runs)."""
    return tuple(float(b) for b in (args.budget_targets or ()))


def evaluated_targets(args):
    """-e on a multi-target model: every budget, or the one --budget names."""
    targets = run_targets(args)
    return (args.budget,) if targets and args.budget >= 0 else targets


def budget_problems(args):
    """(bad, message) pairs for the multi-target flags, checked with the others before any data is read."""
    targets = run_targets(args)
    shown = ", ".join(f"{b:g}" for b in targets)
    return [
        (any(not 0 <= b <= 1 for b in targets), f"--budget_targets must lie in [0, 1] (got {shown})"),
        (len(set(targets)) != len(targets), f"--budget_targets has a budget twice (got {shown})"),
        (bool(targets) and args.budget >= 0 and not args.evaluate,
         "--budget names one budget; a multi-target model trains all of --budget_targets (leave --budget out)"),
        (bool(targets) and args.budget >= 0 and args.budget not in targets,
         f"--budget {args.budget:g} is not one of this model's budgets ({shown})"),
        (bool(args.tied_norms) and not targets,
         "--tied_norms ties the per-budget norms of a multi-target model: add --budget_targets"),
        (args.awareness_metric not in (None, "none") and not targets,
         "--awareness_metric weighs the budgets of a multi-target model: add --budget_targets"),
    ]


def read_performance_targets(path, model, budgets):
    """{budget: target Prec@1} of `model` from a CSV (a row per model name, a column per budget: 0.1 ... 0.9, 1);
    the model name is matched exactly, a budget column by value (1.0 is the column '1')."""
    if not os.path.isfile(path):
        raise ValueError(f"--performance_targets_csv {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if r.get("model") == model), None)
    if row is None:
        raise ValueError(f"{path} has no targets for {model} (its models: {', '.join(r['model'] for r in rows)}); "
                         "give a CSV with a row for it, or --awareness_metric none")
    columns = {}
    for name, value in row.items():
        try:
            columns[float(name)] = value
        except (TypeError, ValueError):
            continue  # the model column
    missing = [b for b in budgets if not (columns.get(b) or "").strip()]
    if missing:
        raise ValueError(f"{path} has no target for {model} at budget {', '.join(f'{b:g}' for b in missing)}")
    return {b: float(columns[b]) for b in budgets}


def awareness_setup(args, model_name):
    """(metric, targets) of the run's budget awareness: l2 by default where the targets CSV has the model."""
    budgets = run_targets(args)
    path = args.performance_targets_csv or DEFAULT_TARGETS_CSV
    metric = args.awareness_metric
    if metric is None:
        try:
            return "l2", read_performance_targets(path, model_name, budgets)
        except ValueError:
            return "none", None
    return metric, None if metric == "none" else read_performance_targets(path, model_name, budgets)
