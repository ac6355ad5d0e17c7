"""Logging on rank 0: a rich console, copies of stdout and stderr in the output directory, and pretrain_log.txt."""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import subprocess
import sys
import traceback
from pathlib import Path
from typing import IO, Iterator, Optional, Tuple

from rich.console import Console
from rich.logging import RichHandler

LOGGER_NAME = "spark_sparse"
STDOUT_BACKUP = "stdout_backup.txt"
STDERR_BACKUP = "stderr_backup.txt"
PRETRAIN_LOG = "pretrain_log.txt"

logger = logging.getLogger(LOGGER_NAME)


class TeeStream(io.TextIOBase):
    """A text stream that writes to a terminal stream and to a copy file; it reports the terminal's properties."""

    def __init__(self, primary: IO[str], copy: IO[str]) -> None:
        super().__init__()
        self.primary = primary
        self.copy = copy

    def write(self, text: str) -> int:
        self.primary.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.primary.flush()
        self.copy.flush()

    def isatty(self) -> bool:
        return self.primary.isatty()

    def fileno(self) -> int:
        return self.primary.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.primary, "encoding", "utf-8")


@contextlib.contextmanager
def rank_logging(is_main: bool, rank: int, out_dir: Path) -> Iterator[Optional[Console]]:
    """Set up output for the block; yield rank 0's rich console, or None on other ranks.

    On rank 0, ``sys.stdout`` and ``sys.stderr`` also write to ``stdout_backup.txt``
    and ``stderr_backup.txt`` (appended across runs). Log records go to a rich
    handler on the terminal and, as plain lines, to ``stdout_backup.txt``. The
    returned console (progress bars) writes to the terminal only, so the copy
    contains no cursor movements. Other ranks log warnings and errors to stderr,
    prefixed with their rank. Everything is restored when the block ends, and the
    traceback of an exception leaving the block is copied to ``stderr_backup.txt``.
    """
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not is_main:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        try:
            yield None
        finally:
            logger.removeHandler(handler)
        return

    out_dir.mkdir(parents=True, exist_ok=True)
    terminal_out, terminal_err = sys.stdout, sys.stderr
    with open(out_dir / STDOUT_BACKUP, "a", buffering=1, encoding="utf-8") as stdout_copy, open(
        out_dir / STDERR_BACKUP, "a", buffering=1, encoding="utf-8"
    ) as stderr_copy:
        console = Console(file=terminal_out)
        rich_handler = RichHandler(console=console, show_path=False, log_time_format="[%m-%d %H:%M:%S]")
        plain_handler = logging.StreamHandler(stdout_copy)
        plain_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(rich_handler)
        logger.addHandler(plain_handler)
        sys.stdout = TeeStream(terminal_out, stdout_copy)
        sys.stderr = TeeStream(terminal_err, stderr_copy)
        try:
            yield console
        except Exception:
            # Python prints the traceback only after sys.stderr is restored, so copy it here.
            stderr_copy.write(traceback.format_exc())
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = terminal_out, terminal_err
            logger.removeHandler(rich_handler)
            logger.removeHandler(plain_handler)


def git_commit(repo_dir: Path) -> Tuple[str, str]:
    """Return the commit id and subject of the repository at ``repo_dir``, or ``[unknown]`` for both."""
    try:
        result = subprocess.run(
            ["git", "-C", str(repo_dir), "log", "-1", "--format=%H%n%s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "[unknown]", "[unknown]"
    lines = result.stdout.splitlines() + ["[unknown]", "[unknown]"]
    return lines[0], lines[1]


class PretrainLog:
    """``pretrain_log.txt``: JSON lines, a header describing the run, then one line per epoch."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / PRETRAIN_LOG

    def start(self, exp_name: str, command: str, model: str, repo_dir: Path, append: bool) -> None:
        """Write the header; with ``append`` (a resumed run), keep the lines of earlier runs."""
        commit_id, commit_message = git_commit(repo_dir)
        header = {
            "name": exp_name,
            "command": command,
            "git_commit_id": commit_id,
            "git_commit_message": commit_message,
            "model": model,
        }
        with open(self.path, "a" if append else "w", encoding="utf-8") as file:
            file.write(json.dumps(header) + "\n")

    def epoch(self, epoch: int, epochs: int, loss: float, remaining_s: float) -> None:
        """Append the line of a finished epoch (1-based ``epoch`` of ``epochs``) with its mean loss."""
        finish = datetime.datetime.now() + datetime.timedelta(seconds=remaining_s)
        line = {
            "epoch": epoch,
            "epochs": epochs,
            "loss": loss,
            "remaining": str(datetime.timedelta(seconds=round(remaining_s))),
            "finish": finish.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")
