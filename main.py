"""Run SparK pre-training in one process (for debugging), or as one of the processes ``run.sh`` starts."""
import sys

from spark_sparse.trainer import main

if __name__ == "__main__":
    sys.exit(main())
