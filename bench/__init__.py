"""Benchmarks. They compare CPU time per call, one core per contender: BLAS libraries are kept
to one thread (before NumPy is imported) so that a multi-threaded BLAS neither spins idle threads
into the figures nor borrows cores the others do not get. Set the variables to override."""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
