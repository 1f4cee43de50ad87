"""Thread-pool sizing shared by the benchmarks that time imgmw against NumPy/SciPy-based references."""
from __future__ import annotations

import os


def pin_thread_pools(argv: list[str]) -> None:
    """Size the OpenMP, OpenBLAS and MKL thread pools to ``--threads`` (default 1) through the environment, before
    NumPy, SciPy and torch start them.

    ``threadpool_limits`` alone, applied after the imports, left scikit-learn's fits of case 4 four to twenty-five
    times slower in CPU time on a shared 2-core VM (0.24-1.7 s per fit instead of 0.065 s, with 3×3
    ``solve_triangular`` calls at 15 ms each): the pools that the imports had started kept costing CPU time,
    which inflated every ratio against scikit-learn."""
    threads = "1"
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
