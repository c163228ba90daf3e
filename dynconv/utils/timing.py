"""Wall-clock timing for the benchmarks: median milliseconds of several callables, alternated run by run so that
a slow phase of the machine hits every variant alike."""
import statistics
import time

import torch


def median_ms(fns, runs, warmup, device=None):
    """{name: median ms} of each callable of `fns` over `runs` timed runs after `warmup` untimed ones; on a CUDA
    `device` every run ends with a synchronisation, so the time is the work's, not the launch's."""
    times = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}
