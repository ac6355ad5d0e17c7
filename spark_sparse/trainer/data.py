"""Pre-training images: where they are found, how they are loaded and augmented, and how batches are drawn."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

# Real photographs that ship inside the scikit-image wheel and load offline (scikit-image 0.26).
BUNDLED_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "moon",
    "coins",
    "horse",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
)
BUNDLED_PHOTOS_DIR = "bundled_photos"


def find_images(data_path: str) -> List[Path]:
    """Return every image file under ``data_path``, sorted; for an ImageNet root, those under ``train/``.

    Class folders and flat folders are both searched recursively, because
    pre-training ignores labels. Extensions are torchvision's ``IMG_EXTENSIONS``,
    matched case-insensitively. Raises ``ValueError`` when none is found.
    """
    root = Path(data_path)
    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a directory; give a folder of images")

    images = []
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(IMG_EXTENSIONS):
                images.append(Path(folder) / name)
    if not images:
        raise ValueError(
            f"no images found under {str(root)!r}; expected files ending in {', '.join(IMG_EXTENSIONS)} "
            f"(any letter case)"
        )
    return sorted(images)


def bundled_photo(name: str) -> np.ndarray:
    """Return scikit-image's bundled photograph ``name`` as a uint8 array (binary images scaled to 0 and 255)."""
    import skimage.data

    pixels = np.asarray(getattr(skimage.data, name)())
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return pixels


def write_bundled_photos(out_dir: Path) -> Path:
    """Write scikit-image's bundled photographs as PNG files under ``out_dir`` (once); return the folder."""
    folder = out_dir / BUNDLED_PHOTOS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_PHOTOS:
        path = folder / f"{name}.png"
        if path.exists():
            continue
        partial = folder / f".{name}.png.partial"
        Image.fromarray(bundled_photo(name)).save(partial, format="PNG")
        os.replace(partial, path)
    return folder


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB.

    Written out rather than torchvision's ``pil_loader`` because PIL's
    ``convert("RGB")`` clips 16-bit and 32-bit images at 255: those are scaled
    to 0..255 first (16-bit by 255/65535, others by their maximum when it
    exceeds 255). Palette images with transparency go through RGBA, as PIL's warning recommends.
    """
    with open(path, "rb") as file:
        image = Image.open(file)
        image.load()

    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(pixels.round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = pixels.max()
        if peak > 255:
            pixels = pixels * (255.0 / peak)
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def build_transform(input_size: Tuple[int, int]) -> transforms.Compose:
    """SparK's pre-training augmentation: random resized crop (scale 0.67 to 1, bicubic), flip, ImageNet mean/std."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                input_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ]
    )


# (dataset index, augmentation seed): one entry of a batch the sampler yields.
SampleKey = Tuple[int, int]

# Errors of reading one image file: missing or unreadable (OSError), not an image or cut short
# (PIL's UnidentifiedImageError and OSError), corrupt headers (SyntaxError, ValueError), too large.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class ImageFiles(Dataset):
    """Image files loaded as RGB (grayscale, palette and alpha images are converted) and transformed.

    An item is a ``(index, seed)`` pair; it returns the transformed image and the
    paths of unreadable files skipped on the way. The transform draws from a torch
    generator seeded with ``seed``, so an image's augmentation depends only on the
    sampler, not on the worker or the process that loads it. An unreadable file is
    replaced by the next readable one in index order.
    """

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> Tuple[torch.Tensor, List[str]]:
        index, seed = key
        skipped: List[str] = []
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                image = load_rgb(path)
            except UNREADABLE_IMAGE_ERRORS:
                skipped.append(str(path))
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(image), skipped
        raise ValueError(f"none of the {len(self.paths)} image files could be read; check the --data_path folder")


def collate_images(items: List[Tuple[torch.Tensor, List[str]]]) -> Tuple[torch.Tensor, List[str]]:
    """Stack a batch's images and join the paths of the unreadable files skipped for it."""
    images = torch.stack([image for image, _ in items])
    skipped = [path for _, paths in items for path in paths]
    return images, skipped


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Return the augmentation seed of the sample at ``position`` of epoch ``epoch``'s global order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class RepeatingBatchSampler(Sampler[List[int]]):
    """Yield this rank's share of every global batch; each epoch is ``ceil(N / global_batch)`` iterations.

    Every epoch shuffles the dataset with a generator seeded by ``seed + epoch``, the
    same on every rank, and lays whole shuffled passes end to end until the last
    batch is full. So each image appears at least once per epoch, the last batch
    is topped up from a further pass, and a dataset smaller than one batch is
    repeated (sampling without replacement within each pass). Rank ``r`` takes
    slice ``r`` of each global batch. Hand-written because
    ``DistributedSampler`` pads only to a multiple of the world size.
    """

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_iteration = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        """Choose the shuffle of ``epoch`` and the first batch to yield; call before iterating."""
        self.epoch = epoch
        self.start_iteration = start_iteration

    def __len__(self) -> int:
        return math.ceil(self.dataset_size / self.global_batch)

    def __iter__(self) -> Iterator[List[SampleKey]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        needed = len(self) * self.global_batch
        passes = [torch.randperm(self.dataset_size, generator=generator) for _ in range(math.ceil(needed / self.dataset_size))]
        order = torch.cat(passes)[:needed].view(len(self), self.global_batch)
        start = self.rank * self.local_batch
        for iteration in range(self.start_iteration, len(self)):
            columns = range(start, start + self.local_batch)
            yield [
                (int(order[iteration, column]), sample_seed(self.seed, self.epoch, iteration * self.global_batch + column))
                for column in columns
            ]


def build_loader(
    paths: Sequence[Path],
    input_size: Tuple[int, int],
    global_batch: int,
    rank: int,
    world_size: int,
    workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Build the loader of this rank's ``(images, skipped paths)`` batches; call ``loader.batch_sampler.set_epoch(e)``.

    The loader gets its own generator, so starting an epoch draws nothing from the
    global torch generator (which drop path uses).
    """
    dataset = ImageFiles(paths, build_transform(input_size))
    sampler = RepeatingBatchSampler(len(dataset), global_batch, rank, world_size, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
