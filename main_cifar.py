"""`python main_cifar.py ...` from a clone: the command dynconv.apps.cifar (`dynconv-cifar` once installed)."""
from dynconv.apps.cifar import main  # noqa: F401  (tests and scripts call main_cifar.main)
from dynconv.utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
