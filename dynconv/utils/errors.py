"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
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
    one-line message and exit code (utils.interrupt), and any other Ctrl-C into 'interrupted' + exit 130."""
    from .interrupt import Interrupted

    try:
        main()
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
