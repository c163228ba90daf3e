"""speedtest --per-stage: where a network's efficiency goes, stage by stage. Every planned block is timed on its
own, the dense network's block of the same name against the engine's plan, in the same alternated runs as the
whole networks; a stage (the module that holds its blocks, e.g. a ResNet's layer1) sums its blocks' median times.
Its ideal speedup is our MAC definition's, as for the whole network: its dense blocks' MACs against the same less
each decision's conditional MACs with every position on plus those it executes and its deciding overhead (a mask
unit). Timing each block adds a few microseconds per block to both networks."""
import collections
import statistics
import time

import torch

from dynconv.flops import COUNTED, layer_macs
from dynconv.utils.timing import median_ms


class _TimedPlan:
    """A plan that records the seconds of each call and its last decision."""

    def __init__(self, plan, sync):
        self.plan, self.sync, self.seconds, self.decision = plan, sync, [], None

    def __call__(self, x, target=None):
        start = time.perf_counter()
        out, self.decision = self.plan(x, target)
        if self.sync:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        return out, self.decision


def _time_module(module, seconds, sync):
    """Hooks that append each forward's seconds of `module` to `seconds`; returns their handles."""
    started = []

    def before(_module, _inputs):
        started.append(time.perf_counter())

    def after(_module, _inputs, _output):
        if sync:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started.pop())

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def _block_macs(dense, names, images):
    """{block name: MACs of the dense block for the batch}, from one forward (the MAC counter's layer rule)."""
    macs = collections.Counter()
    modules = dict(dense.named_modules())

    def hook(name):
        return lambda layer, inputs, output: macs.update({name: layer_macs(layer, inputs, output, False)})

    handles = [layer.register_forward_hook(hook(name)) for name in names for layer in modules[name].modules()
               if isinstance(layer, COUNTED)]
    try:
        with torch.no_grad():
            dense(images)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def stage_rows(dense, sparse, engine, images, runs, warmup, target=None):
    """[{stage, blocks, dense_ms, engine_ms, dense_mmac, sparse_mmac, ideal_speedup, speedup, efficiency}] per
    stage of `sparse`'s planned blocks, in network order; `dense` has the same module names (build_models' pair).
    The engine's plans are wrapped for the runs and put back after."""
    sync = images.device.type == "cuda"
    names = {module: name for name, module in sparse.named_modules()}
    dense_modules = dict(dense.named_modules())
    dense_seconds = collections.defaultdict(list)
    timed, handles = {}, []
    try:
        for block, stand_in in engine.stand_ins.items():
            name = names[block]
            timed[name] = _TimedPlan(stand_in.plan, sync)
            stand_in.plan = timed[name]
            handles += _time_module(dense_modules[name], dense_seconds[name], sync)
        with torch.no_grad():
            median_ms({"dense": lambda: dense(images), "engine": lambda: engine(images, target=target)}, runs,
                      warmup, images.device)
    finally:
        for stand_in in engine.stand_ins.values():
            if isinstance(stand_in.plan, _TimedPlan):
                stand_in.plan = stand_in.plan.plan
        for handle in handles:
            handle.remove()
    dense_macs = _block_macs(dense, list(timed), images)
    stages = collections.defaultdict(lambda: {"blocks": 0, "dense": 0.0, "engine": 0.0, "dense_macs": 0.0,
                                              "sparse_macs": 0.0})
    for name, plan in timed.items():
        stage = stages[name.rsplit(".", 1)[0]]
        _, every_position = plan.decision.conditional()
        stage["blocks"] += 1
        stage["dense"] += 1000 * statistics.median(dense_seconds[name][-runs:])
        stage["engine"] += 1000 * statistics.median(plan.seconds[-runs:])
        stage["dense_macs"] += dense_macs[name]
        stage["sparse_macs"] += dense_macs[name] - every_position + float(plan.decision.macs())
    rows, n = [], images.shape[0]
    for name, s in stages.items():
        ideal = s["dense_macs"] / max(s["sparse_macs"], 1.0)
        speedup = s["dense"] / s["engine"]
        rows.append({"stage": name, "blocks": s["blocks"], "dense_ms": round(s["dense"], 3),
                     "engine_ms": round(s["engine"], 3), "dense_mmac": round(s["dense_macs"] / n / 1e6, 6),
                     "sparse_mmac": round(s["sparse_macs"] / n / 1e6, 6), "ideal_speedup": round(ideal, 3),
                     "speedup": round(speedup, 3), "efficiency": round(speedup / ideal, 3)})
    return rows
