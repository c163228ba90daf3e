"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
import os
import sys


class UserError(Exception):
    """A problem with the user's input (flags, files, data) that the message fully explains."""


def _one_line(error):
    """The message itself, also when a DataLoader worker re-raised it wrapped in its traceback."""
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def run_cli(main):
    """Runs `main()`; turns UserError into 'error: ...' + exit 2, a training run stopped by a signal into its
    one-line message and exit code (utils.interrupt), and any other Ctrl-C or SIGTERM (e.g. while the data set is
    read) into 'interrupted' + exit 130/143, with the run's clean-up done (its directory's lock removed)."""
    import signal
    import threading

    from .interrupt import Interrupted, StopNow

    def terminated(sig, frame):
        raise StopNow(143)

    previous = signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        main()
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job
            print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(getattr(e, "code", 130))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
