"""Data sets and loaders. Errors about missing or malformed data become one-line UserErrors."""
import os

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from .errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def cifar_transforms():
    """The reference's CIFAR-10 transforms (its checkpoints expect this normalisation)."""
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    evaluation = transforms.Compose([transforms.ToTensor(), normalize])
    return train, evaluation


def image_folder(root, split, transform):
    """`root/split/<class>/*.<image>` with clear errors for a missing split or an empty class folder."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: expected an image-folder layout {root}/{split}/<class>/<image files>")
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{path}: {e}")


def cifar10_datasets(root):
    """(train, test, num_classes): an image-folder copy (root/train, root/test) or torchvision's CIFAR-10,
    downloaded into `root` when absent."""
    train_tf, eval_tf = cifar_transforms()
    if os.path.isdir(os.path.join(root, "train")):
        train, test = image_folder(root, "train", train_tf), image_folder(root, "test", eval_tf)
        if train.classes != test.classes:
            raise UserError(f"{root}: train/ and test/ have different class folders")
        return train, test, len(train.classes)
    try:
        train = datasets.CIFAR10(root, train=True, transform=train_tf, download=True)
        test = datasets.CIFAR10(root, train=False, transform=eval_tf, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 is not in '{root}' and could not be downloaded ({type(e).__name__}); "
                        "pass --data pointing at torchvision's cifar-10-batches-py parent folder or at an "
                        "image-folder copy with train/<class>/ and test/<class>/")
    return train, test, 10


def build_loaders(train_set, val_set, batch_size, workers, ctx):
    """Training loader (DistributedSampler under torchrun) and a validation loader over this process's
    share of the validation set: every image is evaluated by exactly one process (no padding)."""
    train_sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True) if ctx.distributed else None
    if ctx.distributed:
        val_set = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=len(train_set) > batch_size, **common)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, **common)
    return train_loader, val_loader, train_sampler


def first_images(dataset, count):
    """The first `count` images of a dataset as one batch (for ponder plots)."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    return torch.stack(images)
