"""How long each command takes to refuse a bad flag: the time from starting Python to the one-line error.

Each command runs --runs times (alternated, so machine noise hits all alike) with a flag it must refuse; the
table gives the median wall-clock seconds, the exit code (2 is argparse's) and the error line. The floor is
`python -c "import torch"`, the first row: a command whose parser needs the model registry cannot answer sooner.
Time it alone (a training run on the same cores makes every row 1.5-3x slower).
"""
import statistics
import subprocess
import sys
import time

from dynconv.utils.cli import OneLineErrorParser
from dynconv.utils.errors import run_cli

EXAMPLES = """examples:
  python -m dynconv.benchmarks.flag_errors              # every command, 5 runs each
  python -m dynconv.benchmarks.flag_errors --runs 11
"""
FLOOR = ("import torch (the floor)", ["-c", "import torch"])
COMMANDS = (
    ("main_cifar.py --model resnet23", ["main_cifar.py", "--model", "resnet23"]),
    ("main_cifar.py --budget 2", ["main_cifar.py", "--budget", "2"]),
    ("main_imagenet.py --epochs x", ["main_imagenet.py", "--epochs", "x"]),
    ("speedtest --models nope", ["-m", "dynconv.benchmarks.speedtest", "--models", "nope"]),
    ("train_speed --steps 0", ["-m", "dynconv.benchmarks.train_speed", "--steps", "0"]),
    ("compare (no runs)", ["-m", "dynconv.scripts.compare"]),
    ("cifar_results --nope", ["-m", "dynconv.scripts.cifar_results", "--nope"]),
)


def timed(argv):
    """(seconds, exit code, last stderr line) of one run of `python argv`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    return time.perf_counter() - start, done.returncode, lines[-1] if lines else ""


def main(argv=None):
    p = OneLineErrorParser(description=__doc__, epilog=EXAMPLES)
    p.add_argument("--runs", type=int, default=5, help="runs per command (the median is reported)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    rows = (FLOOR,) + COMMANDS
    seconds = {name: [] for name, _ in rows}
    last = {}
    for _ in range(args.runs):
        for name, command in rows:
            elapsed, code, line = timed(command)
            seconds[name].append(elapsed)
            last[name] = (code, line)
    width = max(len(name) for name, _ in rows)
    print(f"{'command':<{width}}  median s  exit  error line")
    for name, _ in rows:
        code, line = last[name]
        print(f"{name:<{width}}  {statistics.median(seconds[name]):8.2f}  {code:4d}  {line[:90]}")


if __name__ == "__main__":
    run_cli(main)
