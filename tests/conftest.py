"""Tests import the repository's configs/ package and run train.py from the repository root.

Eight CPU devices for the sharding tests: set before any test initialises jax's backend (the rest
of the suite uses the default device, the first of them). One OpenBLAS thread: eight devices running
LAPACK's SVD at once, each with spinning OpenBLAS threads, made a refresh step of a tiny model take
20 s instead of 0.1 s on 2 cores.

The train.py and bench processes the tests start share one XLA compile cache: most of them compile the
same tiny programs (a finished run, then a killed and a resumed one), and a cached compile takes a
tiny run from 12.5 s to 7.5 s. The pytest processes themselves do not use it, so that in-process
compile timings stay compile timings.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

jax.config.update("jax_num_cpu_devices", 8)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set once by pytest's main process, inherited by its workers
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="galore-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs compile in under 1 s
# A size limit turns on jax's file lock around cache reads and writes: without it, a process could read an entry
# another one is still writing (a warning on stderr, which the one-line-error tests would see).
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
jax.config.update("jax_compilation_cache_dir", None)
