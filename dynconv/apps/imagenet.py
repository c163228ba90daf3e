"""Train or evaluate (DynConv) ResNet-18/34/50/101/152 on ImageNet or any image-folder data set (or Food-101).

    python main_imagenet.py --model resnet101 --budget 0.3 --dataset-root /data/imagenet -s exp/imagenet/resnet101/sparse03
    torchrun --nproc_per_node=4 main_imagenet.py --model resnet50 --budget 0.5 --data /data/imagenet --pretrained
    python main_imagenet.py --model resnet101 --budget 0.3 --data /data/imagenet -r CHECKPOINT -e
"""
import os

from dynconv.models import list_models
from dynconv.utils.cli import build_parser, parse
from dynconv.utils.data import imagenet_style_datasets
from dynconv.utils.errors import run_cli
from dynconv.utils.run import run

EXAMPLES = """examples:
  python main_imagenet.py --model resnet101 --budget 0.3 --data /data/imagenet -s runs/imagenet/resnet101/sparse03
  torchrun --nproc_per_node=4 main_imagenet.py --model resnet50 --budget 0.5 --data /data/imagenet --pretrained
  python main_imagenet.py -r runs/imagenet/resnet101/sparse03 -e --data /data/imagenet --fast
"""
DEFAULTS = dict(model="resnet101", workers=min(8, os.cpu_count() or 1), data="data/imagenet")


def make_parser():
    parser = build_parser("DynConv on ImageNet-style image folders", list_models("imagenet"), DEFAULTS,
                          data_aliases=("--dataset-root",), epilog=EXAMPLES)
    parser.add_argument("--dataset", choices=["imagefolder", "food101"], default="imagefolder",
                        help="image folder with train/ and val/ (ImageNet or any other), or torchvision's Food-101")
    parser.add_argument("--classes", nargs="+", default=None, metavar="C",
                        help="train on a subset: the first N classes (one number) or class names")
    parser.add_argument("--resolution", type=int, default=224, help="crop size (evaluation resizes to 256/224 x)")
    return parser


def datasets(args, config):
    """(train, val, num_classes) of the flags."""
    return imagenet_style_datasets(args.data, config, args.dataset, args.resolution, args.classes, args.auto_augment)


def main(argv=None):
    args, explicit = parse(make_parser(), argv)
    return run(args, "imagenet", datasets, topk=(1, 5), explicit=explicit, default_model=DEFAULTS["model"])


def cli():
    """The installed command (pyproject.toml's [project.scripts]): one-line errors, exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
