"""Inference speed of DynConv ResNets and ConvNeXts: dense model vs masked-dense model vs the sparse engine.

Masks are synthetic at the requested density (spatially clustered blobs like trained masks, or i.i.d. random
pixels, the worst case since dilation then covers almost everything), or come from a trained checkpoint
(--checkpoint, with images from --data when given). For each configuration: the median time of each variant
over --runs runs after --warmup runs, the variants alternated run by run; MMac of the dense and the sparse
model; ideal speedup = dense MMac / sparse MMac; achieved speedup = dense time / engine time; efficiency =
achieved / ideal. The dense model has the same weights (the DynConv model without its mask units) and runs in
eager PyTorch; --compiled-dense also times it compiled (torch.compile with inductor's freezing: BatchNorm folded,
weights prepacked), PyTorch's fastest dense inference, which the engine's own dense kernels (BatchNorm folded,
oneDNN weights prepacked) are closer to, and gives the engine's speedup and efficiency against that too. OpenMP threads
wait actively (OMP_WAIT_POLICY=ACTIVE unless set otherwise), for every variant alike. Prints a compact table;
--csv keeps every column at full precision, --plot draws achieved against ideal speedup (--plot-from redraws it
from a CSV without measuring). Models that decide without spatial masks (DGC's channels, PEDConv's weights) are
measured on the CPU by their own benchmark, named by their config (`speed_benchmark`, e.g.
dynconv/benchmarks/dgc_speed.py), which prints its own table (their variants are not dense/masked/engine) after this
one; --csv and --plot cover the DynConv rows.
"""
import csv
import importlib
import os

# OpenMP workers spin between parallel regions instead of sleeping (the usual setting for CPU inference latency).
# At batch 1 the engine runs many short ops between its matrix products, and waking sleeping workers costs it
# ~5% here. Read when torch loads OpenMP, hence before the import; export OMP_WAIT_POLICY=PASSIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

import torch  # noqa: E402

from dynconv import count_mmac  # noqa: E402
from dynconv.gates import gate_state_keys  # noqa: E402
from dynconv.multitarget import target_state  # noqa: E402
from dynconv.sparse.engine import SparseEngine  # noqa: E402
from dynconv.sparse.masks import KINDS, install_synthetic_masks  # noqa: E402
from dynconv.sparse.ops import BACKENDS  # noqa: E402
from dynconv.models import Decides, build_model, list_models, model_config  # noqa: E402
from dynconv.models.base import tiles_problem  # noqa: E402
from dynconv.utils.checkpoint import filtered_weights, load_checkpoint, load_model_state  # noqa: E402
from dynconv.utils.cli import OneLineErrorParser, device_problem  # noqa: E402
from dynconv.utils.errors import UserError, run_cli  # noqa: E402
from dynconv.utils.run import classifier_keys  # noqa: E402
from dynconv.utils.timing import median_ms  # noqa: E402
from dynconv.benchmarks.stages import stage_rows  # noqa: E402

COLUMNS = ["model", "tiles", "batch", "density", "masks", "active_fraction", "dense_ms", "masked_ms", "engine_ms",
           "dense_mmac", "sparse_mmac", "engine_mmac", "ideal_speedup", "speedup", "efficiency", "compiled_ms",
           "speedup_compiled", "efficiency_compiled"]

EXAMPLES = """examples:
  # synthetic masks: table, CSV and plot of achieved against ideal speedup
  python -m dynconv.benchmarks.speedtest --models resnet50 resnet101 --batch-sizes 1 16 --densities 0.1 0.3 0.5 1.0 \\
      --masks clustered random --csv speed.csv --plot speed.png
  # ConvNeXt-T (its plan: depthwise conv at the active positions, LayerNorm and both Linears on their rows)
  python -m dynconv.benchmarks.speedtest --models convnext_tiny --batch-sizes 1 16 --densities 0.3 1.0 --masks clustered random
  # a trained model's own masks (on images from --data when given, else random inputs)
  python -m dynconv.benchmarks.speedtest --models resnet32 --checkpoint exp/cifar/resnet32/sparse05/checkpoint_best.pth
  # DGC and PEDConv: their own benchmarks' tables (masked / gathered / static group conv; each evaluation path)
  python -m dynconv.benchmarks.speedtest --models dydensenet86 pedconv_resnet18 --batch-sizes 1 32
  # where the efficiency goes: every block timed alone, a line per stage
  python -m dynconv.benchmarks.speedtest --models resnet50 --batch-sizes 1 --densities 0.3 --tiles 8 4 2 1 --per-stage
  # redraw the plot of an earlier run's CSV without measuring
  python -m dynconv.benchmarks.speedtest --plot-from docs/engine_speed_cpu.csv --plot docs/engine_speed_cpu.png
"""


def fmt_ms(value):
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fixed(digits):
    return lambda value: f"{value:.{digits}f}"


# The printed table, narrow enough for a terminal: (header, CSV column, width, format). The CSV keeps COLUMNS.
TABLE = [("model", "model", 13, str), ("batch", "batch", 5, str), ("masks", "masks", 9, str),
         ("density", "density", 12, str), ("active", "active_fraction", 6, fixed(3)),
         ("dense ms", "dense_ms", 9, fmt_ms), ("masked ms", "masked_ms", 9, fmt_ms),
         ("engine ms", "engine_ms", 9, fmt_ms), ("MMac", "sparse_mmac", 8, fixed(1)),
         ("exec MMac", "engine_mmac", 9, fixed(1)), ("ideal", "ideal_speedup", 5, fixed(2)),
         ("speedup", "speedup", 7, fixed(2)), ("eff.", "efficiency", 5, fixed(2))]


# --compiled-dense adds these (past 120 columns; the CSV has its speedup too)
COMPILED_TABLE = [("compiled ms", "compiled_ms", 11, fmt_ms), ("eff. c.", "efficiency_compiled", 7, fixed(2))]


def table_line(cells, columns):
    return " ".join(f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, columns))


def table_header(columns=TABLE):
    return table_line([header for header, _, _, _ in columns], columns)


def table_row(row, columns=TABLE):
    return table_line([fmt(row[key]) for _, key, _, fmt in columns], columns)


def table_columns(args):
    return TABLE + COMPILED_TABLE if args.compiled_dense else TABLE


def family_of(name):
    return "cifar" if name in list_models("cifar") else "imagenet"


def build_models(name, num_classes, device, trained=None, target=None, tiles=None):
    """(dense, sparse) models with the same weights, eval mode, channels-last. `trained`: (path, state dict in
    our layout, budgets, model options) of --checkpoint; a multi-target one's dense model has the norms of budget
    `target`. `tiles`: the sparse model's tile sides per stage (synthetic masks; a checkpoint brings its own)."""
    targets = trained[2] if trained else ()
    options = trained[3] if trained else ({"tiles": tuple(tiles)} if tiles else {})
    sparse = build_model(name, num_classes, spatial_gates=True, targets=targets, options=options)
    if trained is not None:
        load_model_state(sparse, trained[1], trained[0])
    dense = build_model(name, num_classes)
    gates = gate_state_keys(sparse)
    state = {k: v for k, v in sparse.state_dict().items() if k not in gates}
    dense.load_state_dict(target_state(state, sparse, target) if targets else state)
    return [m.eval().to(device, memory_format=torch.channels_last) for m in (dense, sparse)]


def compile_dense(dense, images):
    """The dense model under torch.compile with inductor's freezing (BatchNorm folded into the convs, weights
    prepacked for oneDNN or cuDNN), compiled by a first call on `images`."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(dense)
    with inductor_config.patch(freezing=True), torch.no_grad():
        try:
            compiled(images)
        except Exception as e:  # no C++ compiler, an unsupported op: what torch says, in one line
            raise UserError(f"--compiled-dense: torch.compile failed on the dense model: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    return compiled


def measure(dense, sparse, images, runs, warmup, backend, target=None, compiled=False, per_stage=False):
    """One row's timings and MMac; `target`: the budget of a multi-target model; `compiled`: time the dense model
    compiled too; `per_stage`: also each stage's (benchmarks/stages.py), under "stages"."""
    try:
        engine = SparseEngine(sparse, backend=backend)
    except ValueError as e:  # e.g. the cupy backend without a GPU: the message says what to pass instead
        raise UserError(str(e))
    variants = {"dense": lambda: dense(images), "masked": lambda: sparse(images, target=target),
                "engine": lambda: engine(images, target=target)}
    if compiled:
        dense_compiled = compile_dense(dense, images)
        variants["compiled"] = lambda: dense_compiled(images)
    with torch.no_grad():
        ms = median_ms(variants, runs, warmup, images.device)
        dense_mmac, sparse_mmac = count_mmac(dense, images), count_mmac(sparse, images, target=target)
        masks = sparse(images, target=target)[1]
        engine(images, target=target)  # the plans' executed MACs of this batch
    active = sum(m.hard.sum().item() for m in masks) / sum(m.hard.numel() for m in masks)  # spatial decisions
    ideal = dense_mmac / sparse_mmac
    engine_mmac = sparse_mmac + executed_difference(engine, masks) / 1e6
    speedup = ms["dense"] / ms["engine"]
    extra = {}
    if compiled:
        speedup_compiled = ms["compiled"] / ms["engine"]
        extra = {"compiled_ms": round(ms["compiled"], 3), "speedup_compiled": round(speedup_compiled, 3),
                 "efficiency_compiled": round(speedup_compiled / ideal, 3)}
    if per_stage:
        extra["stages"] = stage_rows(dense, sparse, engine, images, runs, warmup, target)
    return {**extra, "active_fraction": round(active, 4), "dense_ms": round(ms["dense"], 3),
            "masked_ms": round(ms["masked"], 3), "engine_ms": round(ms["engine"], 3),
            "dense_mmac": round(dense_mmac, 3), "sparse_mmac": round(sparse_mmac, 3),
            "engine_mmac": round(engine_mmac, 3),
            "ideal_speedup": round(ideal, 3), "speedup": round(speedup, 3), "efficiency": round(speedup / ideal, 3)}


def executed_difference(engine, decisions):
    """MACs the engine's plans executed in their last call minus our definition's count of the same layers (the
    block convs at the (dilated) mask positions): tile halos and dense fallbacks make it positive. Plans that do
    not report theirs count as defined."""
    reported = [p.executed_macs for p in engine.plans.values() if p.executed_macs is not None]
    if len(reported) != len(decisions):
        return 0.0
    return sum(reported) - sum(float(d.conditional()[0]) for d in decisions)


def load_trained(name, path):
    """--checkpoint: (path, its state dict in our layout, its budgets when multi-target) and its number of
    classes, read from the classifier
    (whatever the model calls it) after the model's checkpoint filter (e.g. the reference's 'module.')."""
    checkpoint = load_checkpoint(path)
    trained_as = (checkpoint.get("args") or {}).get("model")
    if trained_as not in (None, name):
        raise UserError(f"{path} holds a {trained_as}, not a {name}: pass --models {trained_as}")
    saved = checkpoint.get("args") or {}
    targets = tuple(saved.get("budget_targets") or sorted(k for k in checkpoint if isinstance(k, float)))
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in (saved.get("model_kwargs") or {}).items()}
    model = build_model(name, spatial_gates=True, targets=targets, options=options)
    state = filtered_weights(model, model_config(name), checkpoint["state_dict"], path)
    if not gate_state_keys(model) & set(state):
        raise UserError(f"{path} is a static model (no gates): the sparse engine needs a checkpoint with gates "
                        "(mask units), e.g. one trained with --budget 0.5")
    weight = next(k for k in classifier_keys(model) if k.endswith("weight"))
    if weight not in state:
        raise UserError(f"{path} does not fit {name}: it has no classifier weight '{weight}'")
    return (path, state, targets, options), state[weight].shape[0]


def checkpoint_images(args, name, batch, resolution):
    """A batch of evaluation images from --data (CIFAR or image-folder layout), else random inputs."""
    if not args.data:
        return torch.randn(batch, 3, resolution, resolution)
    from dynconv.utils.data import cifar10_datasets, imagenet_style_datasets, first_images

    if family_of(name) == "cifar":
        val = cifar10_datasets(args.data, model_config(name))[1]
    else:
        val = imagenet_style_datasets(args.data, model_config(name), resolution=resolution)[1]
    return first_images(val, batch)[0]  # (images, labels)


def model_rows(name, args, device, trained=None):
    """One measured row per batch size and mask configuration of model `name`, printed as they come.
    `trained`: load_trained's result for --checkpoint, else None (synthetic masks)."""
    resolution = args.resolution or (32 if family_of(name) == "cifar" else 224)
    trained, num_classes = trained or (None, 10 if family_of(name) == "cifar" else 1000)
    # a trained multi-target model: a row per budget ("trained@0.5"); synthetic masks: per kind and density
    budgets = trained[2] if trained else ()
    configs = [("trained", f"trained@{b:g}" if budgets else "trained", b) for b in budgets or (None,)] if trained \
        else [(k, d, None) for k in args.masks for d in args.densities]
    for batch in args.batch_sizes:
        for kind, density, target in configs:
            dense, sparse = build_models(name, num_classes, device, trained, target, args.tiles)
            if trained is None:
                install_synthetic_masks(sparse, density, kind)
                images = torch.randn(batch, 3, resolution, resolution)
            else:
                images = checkpoint_images(args, name, batch, resolution)
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            tiles = trained[3].get("tiles") if trained else args.tiles
            row = {"model": name, "tiles": " ".join(map(str, tiles or ())) or "-", "batch": len(images),
                   "density": density, "masks": kind,
                   **measure(dense, sparse, images, args.runs, args.warmup, args.backend, target,
                             args.compiled_dense, args.per_stage)}
            print(table_row(row, table_columns(args)), flush=True)
            yield row


DEFAULT_MODELS = ("resnet32", "resnet50", "resnet101")


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--models", nargs="+", default=None,
                   choices=list_models("cifar") + list_models("imagenet"), metavar="NAME",
                   help=f"networks to measure ({', '.join(list_models('cifar') + list_models('imagenet'))}; default "
                        f"{' '.join(DEFAULT_MODELS)}, with --checkpoint the checkpoint's network)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="batch sizes to measure")
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                   help="fractions of active positions (of tiles, with --tiles) of the synthetic masks, in [0, 1]; "
                        "0: every gate off, the engine's fixed cost (its engine ms against dense ms)")
    p.add_argument("--tiles", nargs="+", type=int, metavar="G",
                   help="synthetic masks decided per tile: the tile side per stage (as main_*.py --tiles; "
                        "e.g. 8 4 2 1 for ResNet-50); a --checkpoint brings its own")
    p.add_argument("--masks", nargs="+", default=["clustered"], choices=KINDS,
                   help="synthetic mask kinds: clustered blobs (like trained masks) or i.i.d. random pixels")
    p.add_argument("--checkpoint", help="use a trained DynConv model's own masks (one --models name)")
    p.add_argument("--data", help="with --checkpoint: evaluation images from this data set root "
                   "(default: random inputs)")
    p.add_argument("--resolution", type=int, help="input size (default: 32 for CIFAR, 224 for ImageNet models)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first")
    p.add_argument("--compiled-dense", action="store_true",
                   help="also time the dense model compiled (torch.compile, inductor with freezing; ~20 s to compile "
                        "ResNet-50 on 2 CPU cores) and report the engine's speedup and efficiency against it")
    p.add_argument("--per-stage", action="store_true",
                   help="also time every block alone and print each stage's dense ms, engine ms, MMac and efficiency")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="sparse engine backend (auto: CUDA kernels via CuPy on GPUs, torch otherwise)")
    p.add_argument("--device", default="cpu", help="device to measure on (with --plot-from: named in the title)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", help="write every measured row here, full precision")
    p.add_argument("--plot", help="PNG of achieved against ideal speedup (with --plot-from: default CSV.png)")
    p.add_argument("--plot-from", metavar="CSV", help="only redraw --plot from this CSV of an earlier run")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    """Every flag and path checked before anything is measured: one line each (p.error exits with code 2)."""
    if args.models is None and args.checkpoint and not args.plot_from:  # the checkpoint names its network
        trained_as = (load_checkpoint(args.checkpoint).get("args") or {}).get("model")  # one-line errors
        if trained_as is None:
            p.error(f"{args.checkpoint} does not name its network: pass --models NAME")
        args.models = [trained_as]
    args.models = list(args.models or DEFAULT_MODELS)
    if args.plot_from:
        if not os.path.isfile(args.plot_from):
            p.error(f"--plot-from {args.plot_from} does not exist")
        args.plot = args.plot or os.path.splitext(args.plot_from)[0] + ".png"
    elif args.checkpoint and len(args.models) != 1:
        p.error("--checkpoint needs exactly one --models name (the checkpoint's network)")
    elif args.checkpoint and not spatial(args.models[0]):
        p.error(f"--checkpoint measures a trained model's masks; {args.models[0]} has none (its own benchmark "
                "runs without --checkpoint)")
    elif args.data and not args.checkpoint:
        p.error("--data needs --checkpoint (synthetic masks run on random inputs)")
    elif args.data and not os.path.isdir(args.data):
        p.error(f"--data {args.data} does not exist")
    for flag, values, low in (("--batch-sizes", args.batch_sizes, 1), ("--runs", [args.runs], 1),
                              ("--warmup", [args.warmup], 0), ("--threads", [args.threads], 1),
                              ("--resolution", [args.resolution], 8)):
        if None not in values and min(values) < low:  # None: the flag's default choice
            p.error(f"{flag} must be at least {low}, got {min(values)}")
    if not all(0 <= d <= 1 for d in args.densities):
        p.error(f"--densities must lie in [0, 1], got {' '.join(f'{d:g}' for d in args.densities)}")
    if args.tiles and args.checkpoint:
        p.error("--tiles is for synthetic masks: a --checkpoint's model brings its own tiles")
    for name in args.models if args.tiles and not args.plot_from else ():
        stages = (model_config(name).options.get("tiles") or (None,))[0]
        if stages is None:
            p.error(f"{name} takes no --tiles (no spatial gates with tiles)")
        problem = tiles_problem(tuple(args.tiles), len(stages))
        if problem:
            p.error(f"--tiles for {name}: {problem}")
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag} {path}: the folder {os.path.dirname(path)} does not exist")
    own = [name for name in args.models if not spatial(name)]
    if own and not args.plot_from and args.device != "cpu":
        p.error(f"{own[0]} is measured by its own CPU benchmark: leave --device at cpu for it")
    if not args.plot_from and device_problem(args.device):
        p.error(device_problem(args.device))


def spatial(name):
    return model_config(name).gates is Decides.SPATIAL


def run_own_benchmark(name, args):
    """A model without spatial gates: its own benchmark (its config's speed_benchmark), same sizes and runs."""
    module = importlib.import_module(model_config(name).speed_benchmark)
    resolution = args.resolution or (32 if family_of(name) == "cifar" else 224)
    print(f"\n# {name}: {module.__name__.replace('.', '/')}.py", flush=True)
    module.main(module.speedtest_argv(name, resolution, args.batch_sizes, args.runs, args.warmup))


def device_label(name):
    """The device as the plot's title names it: the GPU's own name where there is one."""
    if name.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(name))
    return name.upper() if name == "cpu" else name


# --per-stage: a second table, a line per stage of every measured row
STAGE_TABLE = [("model", "model", 13, str), ("batch", "batch", 5, str), ("density", "density", 12, str),
               ("stage", "stage", 16, str), ("blocks", "blocks", 6, str), ("dense ms", "dense_ms", 9, fmt_ms),
               ("engine ms", "engine_ms", 9, fmt_ms), ("dense MMac", "dense_mmac", 10, fixed(1)),
               ("MMac", "sparse_mmac", 8, fixed(1)), ("ideal", "ideal_speedup", 5, fixed(2)),
               ("speedup", "speedup", 7, fixed(2)), ("eff.", "efficiency", 5, fixed(2))]


def print_stages(rows):
    print("# per stage: each block timed alone, the dense block against its plan (medians, summed per stage)")
    print(table_header(STAGE_TABLE))
    for row in rows:
        for stage in row["stages"]:
            print(table_row({**row, **stage}, STAGE_TABLE))


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # --per-stage rows are printed
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path):
    """Rows of an earlier run's CSV with the plotted columns as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("model", "batch", "masks", "ideal_speedup", "speedup") if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path} is not a speedtest CSV: " + (f"no column {', '.join(missing)}" if rows else "no rows"))
    try:
        return [{**r, "batch": int(r["batch"]), "ideal_speedup": float(r["ideal_speedup"]),
                 "speedup": float(r["speedup"])} for r in rows]
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot_from:
        plot(read_csv(args.plot_from), args.plot, device_label(args.device))
        print(f"=> plot written to {args.plot}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trained = load_trained(args.models[0], args.checkpoint) if args.checkpoint else None  # errors before the table
    masked = [name for name in args.models if spatial(name)]
    if masked:
        print(f"# {args.device}, {torch.get_num_threads()} threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
              "times in ms (medians), speedups against the dense model"
              + (" (eager; eff. c.: against it compiled)" if args.compiled_dense else ""))
        print(table_header(table_columns(args)), flush=True)
    device = torch.device(args.device)
    rows = [row for name in masked for row in model_rows(name, args, device, trained)]
    for name in args.models:
        if not spatial(name):
            run_own_benchmark(name, args)
    if args.per_stage and rows:
        print_stages(rows)
    if args.csv and rows:
        write_csv(rows, args.csv)
    if args.plot and rows:
        plot(rows, args.plot, device_label(args.device))


# line style per batch size, marker per mask kind, colour per model
LINESTYLES, MARKERS = ("-", "--", ":", "-."), {"clustered": "o", "random": "X", "trained": "D"}
# random-mask rows are often single points on top of a clustered curve: larger, black-edged, drawn on top
MARKER_STYLE = {"random": dict(markersize=10, markeredgecolor="black", zorder=3)}


def plot(rows, path, device="CPU"):
    """Achieved against ideal speedup, one curve per (model, batch, masks) group, every group of `rows`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for model, batch, masks in dict.fromkeys((r["model"], r["batch"], r["masks"]) for r in rows):
        sel = sorted((r for r in rows if (r["model"], r["batch"], r["masks"]) == (model, batch, masks)),
                     key=lambda r: r["ideal_speedup"])
        ax.plot([r["ideal_speedup"] for r in sel], [r["speedup"] for r in sel], color=f"C{models.index(model) % 10}",
                linestyle=LINESTYLES[batches.index(batch) % len(LINESTYLES)], marker=MARKERS.get(masks, "s"),
                label=f"{model}, batch {batch}, {masks}", **MARKER_STYLE.get(masks, {}))
    top = max(max(r["ideal_speedup"] for r in rows), max(r["speedup"] for r in rows)) * 1.05
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="ideal (efficiency 1)")
    ax.set_title(f"Sparse engine on {device}: achieved against ideal speedup", fontsize=11)
    ax.set_xlabel("ideal speedup (dense MMac / sparse MMac)")
    ax.set_ylabel("achieved speedup (dense time / engine time)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    # outside the axes: the legend never covers a point, however many groups there are
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
