"""Tiny synthetic image-folder data sets for tests (class = dominant colour, so a model can learn it)."""
import os

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]


def make_image_folder(root, splits=("train", "test"), classes=3, per_class=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(np.array(COLOURS[c % len(COLOURS)]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.jpg"))
    return root


def make_food101(root, classes=("apple_pie", "bibimbap", "churros"), per_split=4, size=40):
    """torchvision's Food-101 layout in miniature: food-101/meta/{train,test}.json and food-101/images/."""
    import json

    base = os.path.join(root, "food-101")
    images = os.path.join(base, "images")
    os.makedirs(os.path.join(base, "meta"), exist_ok=True)
    make_image_folder(images, splits=("",), classes=len(classes), per_class=2 * per_split, size=size)
    for c, name in enumerate(classes):
        os.rename(os.path.join(images, f"class{c}"), os.path.join(images, name))
    for split, offset in (("train", 0), ("test", per_split)):
        meta = {name: [f"{name}/{i:04d}" for i in range(offset, offset + per_split)] for name in classes}
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump(meta, f)
    return root
