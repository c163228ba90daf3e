"""Train or evaluate (DynConv) ResNets on CIFAR-10.

    python main_cifar.py --model resnet32 --budget 0.5 -s exp/cifar/resnet32/sparse05
    python main_cifar.py --model resnet32 --budget 0.5 -r exp/cifar/resnet32/sparse05/checkpoint_best.pth -e
"""
import os

from models import list_models
from utils.cli import build_parser
from utils.data import cifar10_datasets
from utils.errors import run_cli
from utils.run import run

DEFAULTS = dict(model="resnet32", workers=min(4, os.cpu_count() or 1), data="data/cifar10")


def main(argv=None):
    parser = build_parser("DynConv on CIFAR-10", list_models("cifar"), DEFAULTS)
    args = parser.parse_args(argv)
    return run(args, "cifar", lambda a, config: cifar10_datasets(a.data, config), topk=(1,))


if __name__ == "__main__":
    run_cli(main)
