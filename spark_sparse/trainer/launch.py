"""Start the trainer's processes with torchrun, and end a failed job with one line instead of torchrun's traceback.

Usage: ``python -m spark_sparse.trainer.launch [torchrun options] main.py [trainer options]``.
The trainer's processes report user errors themselves in one line on rank 0;
torchrun would then raise ``ChildFailedError`` with its own traceback, so this
wrapper catches it, names the failed process and exits with that process's status.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

# The status main.py returns for invalid arguments, data or checkpoints, after writing its one-line error.
USER_ERROR_STATUS = 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv``; return 0, or the first failed process's exit status."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        status = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        if failure.exitcode != USER_ERROR_STATUS:
            sys.stderr.write(
                f"run.sh: error: process {rank} exited with status {failure.exitcode}; "
                f"see the messages above and stderr_backup.txt in the output directory\n"
            )
        return status
    except SignalException as stop:
        # torchrun forwarded the signal to the trainer's processes, which wrote a checkpoint and reported it.
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    # torchrun logs each failed process at ERROR level over several lines; the line above replaces them.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    sys.exit(main())
