"""`python main_imagenet.py ...` from a clone: the command dynconv.apps.imagenet (`dynconv-imagenet` once installed)."""
from dynconv.apps.imagenet import main  # noqa: F401  (tests and scripts call main_imagenet.main)
from dynconv.utils.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
