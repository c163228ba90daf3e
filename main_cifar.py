"""Train or evaluate (DynConv) ResNets on CIFAR-10.

    python main_cifar.py --model resnet32 --budget 0.5 -s exp/cifar/resnet32/sparse05
    python main_cifar.py --model resnet32 --budget 0.5 -r exp/cifar/resnet32/sparse05/checkpoint_best.pth -e
"""
import os

from models import list_models
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import build_parser
from utils.data import cifar10_datasets
from utils.errors import UserError, run_cli
from utils.training import run

DEFAULTS = dict(model="resnet32", lr=0.1, lr_decay=[150, 250], weight_decay=5e-4, batchsize=256, epochs=350,
                workers=min(4, os.cpu_count() or 1), data="data/cifar10")


def load_pretrained(model, args):
    """--pretrained PATH: weights of a CIFAR checkpoint (e.g. a dense run to start a DynConv run from)."""
    if args.pretrained is True:
        raise UserError("--pretrained needs a checkpoint path for CIFAR models (no published weights to fetch)")
    path = args.pretrained
    load_model_state(model, load_checkpoint(path)["state_dict"], path, allow_missing=(".masker.",))


def main(argv=None):
    parser = build_parser("DynConv on CIFAR-10", list_models("cifar"), DEFAULTS)
    args = parser.parse_args(argv)
    run(args, "cifar", lambda a: cifar10_datasets(a.data), topk=(1,), load_pretrained=load_pretrained)


if __name__ == "__main__":
    run_cli(main)
