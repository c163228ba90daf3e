"""Data sets and loaders. Errors about missing or malformed data become one-line UserErrors."""
import contextlib
import os

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

# torchvision is imported in the functions that use it: it takes seconds, and the entry scripts import this module
# before they check the command line's flags (a bad flag fails at once)

from .errors import UserError
from .interrupt import ignore_stop_signals



class UnreadableImageError(UserError):
    pass


def checked_loader(path):
    """PIL loader that names the file it cannot read. We stop rather than skip: silently dropping images
    would change the data set and the accuracy reported on it. (PIL's own message names an open file object,
    not the path: ours is the path and the kind of error.)"""
    from torchvision import datasets

    try:
        return datasets.folder.default_loader(path)
    except (OSError, ValueError) as e:
        raise UnreadableImageError(f"cannot read image {path} ({type(e).__name__}: not a decodable image); remove "
                                   "or replace it")


CIFAR_SIZE = 32


def cifar_transforms(config, resolution=CIFAR_SIZE):
    """CIFAR transforms: random 32x32 crops of the 4-padded image + flips for training; the model's
    normalisation (ModelConfig.mean/std: the reference's for the DynConv ResNets, which its checkpoints expect).
    Another `resolution` resizes every image to it (bilinear) first, padding and cropping at the new size: the
    networks' MACs follow the input size (the DynConv course reproduction's way of varying them)."""
    from torchvision import transforms

    normalize = transforms.Normalize(config.mean, config.std)
    resize = [] if resolution == CIFAR_SIZE else [transforms.Resize((resolution, resolution))]
    padding = round(4 * resolution / CIFAR_SIZE)
    train = transforms.Compose([*resize, transforms.RandomCrop(resolution, padding=padding),
                                transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    evaluation = transforms.Compose([*resize, transforms.ToTensor(), normalize])
    return train, evaluation


def image_folder(root, split, transform):
    """`root/split/<class>/*.<image>` with clear errors for a missing split or an empty class folder."""
    from torchvision import datasets

    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: expected an image-folder layout {root}/{split}/<class>/<image files>")
    try:
        return datasets.ImageFolder(path, transform=transform, loader=checked_loader)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{path}: {e}")


@contextlib.contextmanager
def _removed_on_failure(root):
    """A failed download leaves no empty folders behind where there were none (only empty ones are removed)."""
    missing = []
    path = os.path.abspath(root)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            if os.path.isdir(folder) and not any(os.scandir(folder)):
                os.rmdir(folder)
        raise


def cifar10_datasets(root, config, resolution=CIFAR_SIZE):
    """(train, test, num_classes): an image-folder copy (root/train, root/test) or torchvision's CIFAR-10,
    downloaded into `root` when absent; images at `resolution` (see cifar_transforms)."""
    from torchvision import datasets

    train_tf, eval_tf = cifar_transforms(config, resolution)
    if os.path.isdir(os.path.join(root, "train")):
        train, test = image_folder(root, "train", train_tf), image_folder(root, "test", eval_tf)
        if train.classes != test.classes:
            raise UserError(f"{root}: train/ and test/ have different class folders")
        return train, test, len(train.classes)
    try:
        with _removed_on_failure(root):
            train = datasets.CIFAR10(root, train=True, transform=train_tf, download=True)
            test = datasets.CIFAR10(root, train=False, transform=eval_tf, download=True)
    except Exception as e:
        raise UserError(f"CIFAR-10 is not in '{root}' and could not be downloaded ({type(e).__name__}); "
                        "pass --data pointing at torchvision's cifar-10-batches-py parent folder or at an "
                        "image-folder copy with train/<class>/ and test/<class>/")
    return train, test, 10


def imagenet_transforms(config, resolution=224, auto_augment="none"):
    """Train: RandomResizedCrop + flip (+ torchvision's AutoAugment with its ImageNet policy); evaluation: Resize(resolution / crop fraction, the model's interpolation)
    + CenterCrop (ResNets: 256/224 x, bilinear); the model's normalisation."""
    from torchvision import transforms

    normalize = transforms.Normalize(config.mean, config.std)
    interpolation = transforms.InterpolationMode(config.interpolation)
    augment = [transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)] if auto_augment == "imagenet" else []
    train = transforms.Compose([transforms.RandomResizedCrop(resolution, interpolation=interpolation),
                                transforms.RandomHorizontalFlip(), *augment, transforms.ToTensor(), normalize])
    evaluation = transforms.Compose([transforms.Resize(round(resolution / config.crop_fraction), interpolation),
                                     transforms.CenterCrop(resolution), transforms.ToTensor(), normalize])
    return train, evaluation


class ClassSubset(torch.utils.data.Dataset):
    """The samples of some classes of a data set, relabelled 0..K-1 in the given order."""

    def __init__(self, dataset, labels, keep):
        remap = {old: new for new, old in enumerate(keep)}
        self.dataset = dataset
        self.indices = [i for i, label in enumerate(labels) if label in remap]
        self.labels = [remap[labels[i]] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]][0], self.labels[i]


def select_classes(train, val, classes, labels_of, class_names):
    """`classes`: None (all), a count N (the first N classes) or class names. Returns (train, val, K)."""
    if not classes:
        return train, val, len(class_names)
    if len(classes) == 1 and classes[0].isdigit():
        count = int(classes[0])
        if not 1 <= count <= len(class_names):
            raise UserError(f"--classes {count}: the data set has {len(class_names)} classes")
        keep = list(range(count))
    else:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise UserError(f"unknown classes {', '.join(unknown)} (e.g. {', '.join(class_names[:5])})")
        keep = [class_names.index(c) for c in classes]
    return ClassSubset(train, labels_of(train), keep), ClassSubset(val, labels_of(val), keep), len(keep)


def imagenet_style_datasets(root, config, dataset="imagefolder", resolution=224, classes=None, auto_augment="none"):
    """(train, val, num_classes) for main_imagenet.py: an image folder with train/ and val/ or test/ (ImageNet or any
    other), or torchvision's Food-101 (downloaded into root when absent). `classes` selects a subset."""
    from torchvision import datasets

    train_tf, eval_tf = imagenet_transforms(config, resolution, auto_augment)
    if dataset == "food101":
        try:
            with _removed_on_failure(root):
                train = datasets.Food101(root, split="train", transform=train_tf, download=True,
                                         loader=checked_loader)
                val = datasets.Food101(root, split="test", transform=eval_tf, download=True, loader=checked_loader)
        except Exception as e:
            raise UserError(f"Food-101 is not in '{root}' and could not be downloaded ({type(e).__name__}); "
                            "put torchvision's food-101/ folder there")
        return select_classes(train, val, classes, lambda d: d._labels, train.classes)
    held_out = next((split for split in ("val", "test") if os.path.isdir(os.path.join(root, split))), None)
    if not os.path.isdir(os.path.join(root, "train")) or held_out is None:
        raise UserError(f"{root} needs train/ and val/ (or test/) folders: the image-folder layout "
                        f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
    train, val = image_folder(root, "train", train_tf), image_folder(root, held_out, eval_tf)
    if train.classes != val.classes:
        raise UserError(f"{root}: train/ and {held_out}/ have different class folders")
    return select_classes(train, val, classes, lambda d: d.targets, train.classes)


class EpochSampler(torch.utils.data.Sampler):
    """The training order: a permutation that is a function of (seed, epoch) alone (DistributedSampler's own
    order under torchrun), fixed by `begin(epoch, skip)` before the epoch runs. A run resumed in the middle of an
    epoch gets the same order and skips the samples already trained on, without loading them."""

    def __init__(self, dataset, seed, ctx):
        self.size, self.seed = len(dataset), seed
        self.distributed = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed) \
            if ctx.distributed else None
        self.order, self.skip = [], 0

    def begin(self, epoch, skip=0):
        if self.distributed is not None:
            self.distributed.set_epoch(epoch)
            order = list(self.distributed)
        else:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        self.order, self.skip = order[skip:], skip

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return (len(self.distributed) if self.distributed is not None else self.size) - self.skip


def build_loaders(train_set, val_set, batch_size, workers, ctx, seed=0):
    """Training loader (an EpochSampler: call `loader.sampler.begin(epoch)` before each epoch) and a validation
    loader over this process's share of the validation set: every image is evaluated by exactly one process (no
    padding)."""
    if ctx.distributed:
        val_set = Subset(val_set, range(ctx.rank, len(val_set), ctx.world_size))
    common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                  worker_init_fn=ignore_stop_signals)  # the main process handles SIGINT/SIGTERM (utils.interrupt)
    # the loader's own generator (worker seeds) keeps it from drawing on the global RNG that the model uses
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=EpochSampler(train_set, seed, ctx),
                              drop_last=len(train_set) > batch_size, generator=torch.Generator().manual_seed(seed),
                              **common)
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, **common)
    return train_loader, val_loader


def limited(dataset, limit, batch_size, seed=0):
    """A quick trial's share of a split (PyTorch Lightning's --limit_train_batches / --limit_val_batches): an int
    is a number of minibatches, a float in (0, 1] a fraction of the split; None or 1.0 the whole split. The images
    are a fixed random subset (seed 0 unless given), not the first ones: image folders are sorted by class."""
    if limit is None or limit == 1.0:
        return dataset
    count = round(limit * len(dataset)) if isinstance(limit, float) else limit * batch_size
    count = max(1, min(count, len(dataset)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, sorted(order.tolist()))


def image_paths(dataset):
    """The files a data set reads (through Subset and ClassSubset to an image folder's samples); [] when it reads
    none of its own (torchvision's pickled CIFAR-10, random data)."""
    indices = None
    while not hasattr(dataset, "samples"):
        if not hasattr(dataset, "dataset"):
            return []
        if hasattr(dataset, "indices"):
            indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    paths = [path for path, _ in dataset.samples]
    return paths if indices is None else [paths[i] for i in indices]


def _unreadable(path):
    from PIL import Image

    try:
        with Image.open(path) as image:  # the header only: empty, truncated-header or non-image files
            image.size
    except (OSError, ValueError, SyntaxError):
        return path
    return None


def check_images(splits, workers=0):
    """Every file the splits read opens as an image (a header check, ~70 us per file, in a thread pool of
    `workers` threads): before training, so that a bad file is not met mid-epoch, where the epoch's work would be
    lost. We stop rather than skip, as checked_loader does: dropping images silently changes the data set.
    Returns the number of files checked; UserError listing the bad ones."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for split in splits for p in image_paths(split)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        bad = [p for p in pool.map(_unreadable, paths, chunksize=256) if p is not None]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UnreadableImageError(f"cannot read image{'s' if len(bad) > 1 else ''} {shown} (not decodable: "
                                   f"{len(bad)} of {len(paths)} files); remove or replace them")
    return len(paths)


def first_images(dataset, count):
    """The first `count` images of a dataset as one batch, and their labels (for ponder plots)."""
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def class_names(dataset):
    """The class names of a data set (through subsets and class selections), or None."""
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "classes", None)
