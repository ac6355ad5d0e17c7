"""Save scikit-image's photos to an .npz file, for benchmark runs on a machine without scikit-image.

    python kernels_bench/export_photos.py .gpuwheels/photos.npz

The benchmarks read the file with ``--photos FILE``. Each photo is stored as a
256x256 RGB uint8 array (about 3 MB in all); the benchmarks resize it to the input size.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the project from the repository root instead of this folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
from typing import Optional, Sequence

import numpy as np

from kernels_bench.workload import photo_arrays

STORED_SIDE = 256


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the .npz file to write")
    args = parser.parse_args(argv)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.path, **photo_arrays(STORED_SIDE))
    print(f"photos: {args.path} ({args.path.stat().st_size / 2**20:.1f} MiB)")
    return args.path


if __name__ == "__main__":
    main()
