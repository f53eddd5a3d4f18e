"""`rmt-fast-bench`, the console entry point. The command line, the list of benchmarks and the way each one
runs belong to :mod:`rmt_fast.bench.runner` (its docstring describes how to write a benchmark)."""

import sys

from .runner import BENCHMARKS, NOT_IN_ALL, main, print_summary, run_one

__all__ = ["BENCHMARKS", "NOT_IN_ALL", "main", "print_summary", "run_one"]

if __name__ == "__main__":
    sys.exit(main())
