"""The run directory of a training run: created and tested for writing before any data is read, locked while the
run writes to it (one run per directory), and refused when it holds another run's checkpoints."""
import contextlib
import os
import socket

from .checkpoint import LATEST
from .errors import UserError

LOCK = ".lock"


def _created_folders(directory):
    """The folders os.makedirs(directory) would create, deepest first."""
    missing, path = [], os.path.abspath(directory)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path):
    """(pid, host) written in a lock file, or None when it cannot be read (a half-written lock)."""
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None


def _take(path):
    """Creates the lock file (O_EXCL: of two runs starting at once, one gets it); False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


@contextlib.contextmanager
def run_directory(directory, active=True):
    """Creates `directory`, writes its lock file (which tests that it is writable) and holds it for the run; on
    exit removes the lock, and the folders it created when the run left them empty (a run that fails early leaves
    nothing behind). A lock of a process that no longer runs (on this host) is taken over, with a line; a live one
    is an error. `active` False (evaluation, ranks other than 0): nothing is created or locked."""
    if not active:
        yield
        return
    created = _created_folders(directory)
    lock = os.path.join(directory, LOCK)
    try:
        os.makedirs(directory, exist_ok=True)
        taken = _take(lock)
    except OSError as e:
        _remove_empty(created)
        raise UserError(f"cannot write to save directory {directory} ({e.strerror or type(e).__name__}); "
                        "choose another -s")
    if not taken:
        holder = _holder(lock)
        if holder is not None and (holder[1] != socket.gethostname() or _alive(holder[0])):
            raise UserError(f"another run (process {holder[0]} on {holder[1]}) is writing to {directory}; wait for "
                            f"it to end, or choose another -s (if it has ended on another machine, remove {lock})")
        print(f"=> {directory}: taking over the lock of a run that no longer runs "
              f"({'unreadable' if holder is None else f'process {holder[0]}'})")
        os.remove(lock)
        if not _take(lock):
            raise UserError(f"another run took {directory} at the same moment; choose another -s")
    try:
        yield
    finally:
        if _holder(lock) == (os.getpid(), socket.gethostname()):
            os.remove(lock)
        _remove_empty(created)


def _remove_empty(folders):
    for folder in folders:  # deepest first
        if os.path.isdir(folder) and not any(os.scandir(folder)):
            os.rmdir(folder)


def _same_run(saved, given):
    """Whether a saved run's flags agree with every flag given on this command that shapes a run."""
    return bool(saved) and all(saved.get(k) == v for k, v in given.items() if k in saved)


NOT_A_RUN_FLAG = {"save_dir", "resume", "overwrite", "workers", "data", "device", "evaluate", "log_dir"}


def check_run_dir(run_dir, overwrite, args, explicit, script, read_args):
    """A run that starts (or resumes from elsewhere) into `run_dir` refuses checkpoints already there without
    --overwrite. When they are this command's own run (its checkpoint.pth has the flags given here), the message
    says so and gives the command that resumes it. `read_args(path)`: the args dict stored in a checkpoint."""
    existing = sorted(f for f in os.listdir(run_dir) if f.endswith(".pth")) if os.path.isdir(run_dir) else []
    if not existing or overwrite:
        return
    latest = os.path.join(run_dir, LATEST)
    given = {k: getattr(args, k) for k in explicit if k not in NOT_A_RUN_FLAG and hasattr(args, k)}
    if LATEST in existing and _same_run(read_args(latest), given):
        raise UserError(f"{run_dir} already holds this command's own run ({', '.join(existing)}); resume it with "
                        f"`python {script} -r {run_dir}` (flags from the checkpoint), or pass --overwrite to start "
                        "it again")
    raise UserError(f"{run_dir} already holds {', '.join(existing)} from another run; resume it with "
                    f"-r {run_dir}" + (f" (needs {LATEST})" if LATEST not in existing else "") +
                    ", choose another -s, or pass --overwrite to replace them")
