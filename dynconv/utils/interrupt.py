"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (what clusters send before preempting a job)
ask the training loop to save a resumable checkpoint at the next optimizer update and stop; a second Ctrl-C
stops at once. The message names what was saved, never a checkpoint that does not exist."""
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


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a request the training loop polls (`requested(ctx)`)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = sig
        print(f"\n{signal.Signals(sig).name} received: saving a resumable checkpoint after this step "
              "(Ctrl-C again to stop at once)", flush=True)

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
