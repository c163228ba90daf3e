"""User-facing errors: one line on stderr and exit code 2, never a traceback."""
import sys


class UserError(Exception):
    """A problem with the user's input (flags, files, data) that the message fully explains."""


def run_cli(main):
    """Runs `main()`; turns UserError into 'error: ...' + exit 2 and Ctrl-C into a one-line exit 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept", file=sys.stderr)
        sys.exit(130)
