"""Shared fixtures: real photographs from scikit-image, resized and normalised as the trainer does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def load_photos(names, height: int, width: int) -> torch.Tensor:
    """Return ``(len(names), 3, height, width)`` ImageNet-normalised photos."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    images = []
    for name in names:
        array = getattr(skimage_data, name)()
        image = Image.fromarray(np.asarray(array)).convert("RGB").resize((width, height), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        images.append((tensor - mean) / std)
    return torch.stack(images)


@pytest.fixture(scope="session")
def photos_64() -> torch.Tensor:
    return load_photos(PHOTO_NAMES, 64, 64)


@pytest.fixture(scope="session")
def photos_96() -> torch.Tensor:
    return load_photos(PHOTO_NAMES, 96, 96)
