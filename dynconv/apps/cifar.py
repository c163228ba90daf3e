"""Train or evaluate (DynConv) ResNets on CIFAR-10.

    python main_cifar.py --model resnet32 --budget 0.5 -s exp/cifar/resnet32/sparse05
    python main_cifar.py --model resnet32 --budget 0.5 -r exp/cifar/resnet32/sparse05/checkpoint_best.pth -e
"""
import os

from dynconv.models import list_models
from dynconv.utils.cli import build_parser, parse
from dynconv.utils.data import CIFAR_SIZE, cifar10_datasets
from dynconv.utils.errors import run_cli
from dynconv.utils.run import run

EXAMPLES = """examples:
  python main_cifar.py --model resnet32 --budget 0.5 -s runs/cifar/resnet32/sparse05      # train (the reference's recipe)
  python main_cifar.py -r runs/cifar/resnet32/sparse05                                     # resume (flags from the checkpoint)
  python main_cifar.py -r exp/cifar/resnet32/sparse05 -e --data data/cifar10-jpeg          # evaluate checkpoint_best.pth
  python main_cifar.py -r exp/cifar/resnet32/sparse05 -e --fast --plot_ponder --data data/cifar10-jpeg
"""
DEFAULTS = dict(model="resnet32", workers=min(4, os.cpu_count() or 1), data="data/cifar10")


def make_parser():
    parser = build_parser("DynConv on CIFAR-10", list_models("cifar"), DEFAULTS, epilog=EXAMPLES)
    parser.add_argument("--resolution", type=int, default=CIFAR_SIZE,
                        help="input size: other values resize every image to it (MACs follow the input size)")
    return parser


def datasets(args, config):
    """(train, test, num_classes) of the flags."""
    return cifar10_datasets(args.data, config, args.resolution)


def main(argv=None):
    args, explicit = parse(make_parser(), argv)
    return run(args, "cifar", datasets, topk=(1,), explicit=explicit, default_model=DEFAULTS["model"])


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
