"""Tests import the repository's configs/ package and run train.py from the repository root.

Eight CPU devices for the sharding tests: set before any test initialises jax's backend (the rest
of the suite uses the default device, the first of them).
"""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

jax.config.update("jax_num_cpu_devices", 8)
