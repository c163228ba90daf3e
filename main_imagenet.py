"""Train or evaluate (DynConv) ResNet-18/34/50/101/152 on ImageNet or any image-folder data set (or Food-101).

    python main_imagenet.py --model resnet101 --budget 0.3 --dataset-root /data/imagenet -s exp/imagenet/resnet101/sparse03
    torchrun --nproc_per_node=4 main_imagenet.py --model resnet50 --budget 0.5 --data /data/imagenet --pretrained
    python main_imagenet.py --model resnet101 --budget 0.3 --data /data/imagenet -r CHECKPOINT -e
"""
import contextlib
import io
import os

import torch
import torchvision

from models import list_models
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import build_parser
from utils.data import imagenet_style_datasets
from utils.errors import UserError, run_cli
from utils.training import run

DEFAULTS = dict(model="resnet101", lr=0.025, lr_decay=[30, 60, 90], weight_decay=1e-4, batchsize=64, epochs=100,
                workers=min(8, os.cpu_count() or 1), data="data/imagenet")
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                       "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights",
                       "resnet152": "ResNet152_Weights"}


def torchvision_state_dict(name):
    """torchvision's ImageNet weights, from the torch hub cache or downloaded into it."""
    weights = getattr(torchvision.models, TORCHVISION_WEIGHTS[name]).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub announces the download attempt
            return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:
        raise UserError(f"torchvision's ImageNet weights for {name} are not cached ({cached}) and could not be "
                        f"downloaded ({type(e).__name__}); copy the file there or pass --pretrained PATH")


def load_pretrained(model, args):
    """--pretrained: torchvision's weights; --pretrained PATH: a local state dict or checkpoint. Mask units keep
    their fresh initialisation; the classifier too when the number of classes differs."""
    if args.pretrained is True:
        state_dict, source = torchvision_state_dict(args.model), f"torchvision's {args.model} weights"
    else:
        state_dict, source = load_checkpoint(args.pretrained)["state_dict"], args.pretrained
    allow_missing = (".masker.",)
    if state_dict.get("fc.weight") is not None and state_dict["fc.weight"].shape != model.fc.weight.shape:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        allow_missing += ("fc.",)
    load_model_state(model, state_dict, source, allow_missing=allow_missing)


def main(argv=None):
    parser = build_parser("DynConv on ImageNet-style image folders", list_models("imagenet"), DEFAULTS,
                          data_aliases=("--dataset-root",))
    parser.add_argument("--dataset", choices=["imagefolder", "food101"], default="imagefolder",
                        help="image folder with train/ and val/ (ImageNet or any other), or torchvision's Food-101")
    parser.add_argument("--classes", nargs="+", default=None, metavar="C",
                        help="train on a subset: the first N classes (one number) or class names")
    parser.add_argument("--resolution", type=int, default=224, help="crop size (evaluation resizes to 256/224 x)")
    args = parser.parse_args(argv)
    run(args, "imagenet", lambda a: imagenet_style_datasets(a.data, a.dataset, a.resolution, a.classes),
        topk=(1, 5), load_pretrained=load_pretrained)


if __name__ == "__main__":
    run_cli(main)
