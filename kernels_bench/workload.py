"""Benchmark inputs (real photos, seeded masks) and the description of the machine a record stores."""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from spark_sparse.backends import spconv_engine
from spark_sparse.masking import draw_mask
from spark_sparse.trainer.data import BUNDLED_PHOTOS, bundled_photo

# The trainer's bundled photographs without its two drawings ("logo" and "text").
PHOTO_NAMES = tuple(name for name in BUNDLED_PHOTOS if name not in ("logo", "text"))


def photo_arrays(side: int = 0) -> Dict[str, np.ndarray]:
    """Return scikit-image's photos as RGB uint8 arrays, resized to ``side x side`` when ``side`` is set."""
    arrays = {}
    for name in PHOTO_NAMES:
        image = Image.fromarray(bundled_photo(name)).convert("RGB")
        if side:
            image = image.resize((side, side), Image.BICUBIC)
        arrays[name] = np.asarray(image)
    return arrays


def load_photos(batch_size: int, size: Tuple[int, int], photo_file: Optional[Path] = None) -> torch.Tensor:
    """Return ``(batch_size, 3, H, W)`` ImageNet-normalised photos, cycling through the available ones.

    The photos come from scikit-image, or from ``photo_file`` (written by
    ``export_photos.py``) on a machine without scikit-image.
    """
    height, width = size
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    if photo_file is not None:
        with np.load(photo_file) as stored:
            arrays = {name: stored[name] for name in stored.files}
    else:
        arrays = photo_arrays()

    photos = []
    for array in list(arrays.values())[: min(batch_size, len(arrays))]:
        image = Image.fromarray(array).resize((width, height), Image.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
        photos.append((tensor - mean) / std)

    repeats = -(-batch_size // len(photos))
    return torch.stack(photos * repeats)[:batch_size].contiguous()


def seeded_mask(batch_size: int, grid_size: Tuple[int, int], mask_ratio: float, seed: int) -> torch.Tensor:
    """Draw the ``(B, 1, h, w)`` mask of ``seed``; every backend and layout gets this same mask."""
    return draw_mask(batch_size, grid_size, mask_ratio, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Return fp16 autocast on a CUDA device when ``enabled``, else a no-op context."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda[:i]`` into a device; ``auto`` picks CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"invalid device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {name!r} was requested but torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"device {name!r} is not supported; use auto, cpu or cuda")
    return device


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _spconv_version() -> Optional[str]:
    """Return the installed spconv flavour and version (``spconv``, ``spconv-cu126``, ...), or None."""
    for flavour in ("spconv", "spconv-cu126", "spconv-cu124", "spconv-cu121", "spconv-cu120"):
        version = _package_version(flavour)
        if version is not None:
            return f"{flavour} {version}"
    try:
        import spconv
    except ImportError:
        return None
    return f"spconv {getattr(spconv, '__version__', 'unknown')} (imported from {os.path.dirname(spconv.__file__)})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_kind(device: torch.device) -> str:
    """Return a short file-name-safe label such as ``cpu-2threads`` or ``gpu-nvidia-h200``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "gpu-" + "".join(char if char.isalnum() else "-" for char in name).strip("-")
    return f"cpu-{torch.get_num_threads()}threads"


def machine_info(device: torch.device, amp: bool) -> Dict[str, object]:
    """Describe the machine, library versions and precision of a run for its record."""
    info: Dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _package_version("timm"),
        "spconv": _spconv_version(),
        "dtype": "float16 autocast" if amp and device.type == "cuda" else "float32",
        "spconv_backend_convolution": (
            "spconv kernels" if device.type == "cuda" and spconv_engine.is_available() else "gather-GEMM in PyTorch"
        ),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
