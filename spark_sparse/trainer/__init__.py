"""The pre-training loop: arguments, data, processes, checkpoints, logging and the epoch engine."""
from __future__ import annotations

from .run import main

__all__ = ["main"]
