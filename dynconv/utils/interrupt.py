"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (what clusters send before preempting a job)
ask the training loop to save a resumable checkpoint at the next optimizer update and stop; a second signal
stops at once. The message names what was saved, never a checkpoint that does not exist.

Schedulers, `timeout` and a terminal's Ctrl-C signal the whole process group, DataLoader workers included: the
workers ignore both signals (`ignore_stop_signals`, their worker_init_fn) and are shut down by the main process
once it has saved. torchrun forwards the SIGTERM it gets to its workers, which then get it twice (from the group
and from torchrun): under torchrun a repeat within a few seconds is the same request."""
import os
import signal
import threading
import time

from .distributed import all_reduce_sum

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """The run stopped on a signal; `message` says what was saved, `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopNow(KeyboardInterrupt):
    """A second signal: stop at once (exit status `code`)."""

    def __init__(self, code):
        super().__init__()
        self.code = code


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: the main process alone handles SIGINT/SIGTERM (it saves, then ends the workers);
    a worker killed by the group's signal would make the loader raise instead."""
    for sig in EXIT_CODES:
        signal.signal(sig, signal.SIG_IGN)


REPEAT_SECONDS = 5.0  # torchrun's forwarded copy of the group's signal arrives within this


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a request the training loop polls (`requested(ctx)`)."""

    def __init__(self):
        self._arrivals = []  # (signal, time) per signal caught, in the order the handlers took them
        self._previous = {}
        self._torchrun = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
        self._speaks = os.environ.get("RANK", "0") == "0"  # one line from a torchrun job, not one per process

    @property
    def signal(self):
        """The signal that asked to stop (the first one caught), or None."""
        return self._arrivals[0][0] if self._arrivals else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, frame):
        # torchrun's copy can land while this handler runs (Python then runs a second handler inside the first):
        # the one append is atomic, so exactly one handler finds itself first, whichever way the two interleave
        arrival = (sig, time.monotonic())
        self._arrivals.append(arrival)
        first_sig, first_time = self._arrivals[0]
        if self._arrivals[0] is not arrival:
            if self._torchrun and sig == first_sig and arrival[1] - first_time < REPEAT_SECONDS:
                return  # torchrun's forwarded copy of the signal the group already got
            raise StopNow(EXIT_CODES[sig])  # a second signal: stop now
        if self._speaks:
            print(f"\n{signal.Signals(sig).name} received: saving a resumable checkpoint after this step "
                  "(a second signal stops at once)", flush=True)

    def requested(self, ctx):
        """Whether to stop now; under torchrun every process agrees (one small all-reduce)."""
        if not ctx.distributed:
            return self.signal is not None
        import torch

        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=ctx.device)
        return all_reduce_sum(flag, ctx).item() > 0

    @property
    def exit_code(self):
        return EXIT_CODES.get(self.signal, 130)


class SavePolicy:
    """When to write a mid-epoch checkpoint besides the end of each epoch: every N updates and/or M minutes."""

    def __init__(self, every_steps=None, every_minutes=None):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self._updates, self._since = 0, time.monotonic()

    def due(self):
        self._updates += 1
        steps = self.every_steps and self._updates >= self.every_steps
        minutes = self.every_minutes and time.monotonic() - self._since >= 60 * self.every_minutes
        return bool(steps or minutes)

    def saved(self):
        self._updates, self._since = 0, time.monotonic()
