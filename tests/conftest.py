"""Tests import the repository's configs/ package and run train.py from the repository root.

Eight CPU devices for the sharding tests: set before any test initialises jax's backend (the rest
of the suite uses the default device, the first of them). One OpenBLAS thread: eight devices running
LAPACK's SVD at once, each with spinning OpenBLAS threads, made a refresh step of a tiny model take
20 s instead of 0.1 s on 2 cores.
"""

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

jax.config.update("jax_num_cpu_devices", 8)
