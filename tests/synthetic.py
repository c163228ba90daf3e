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
