"""galore-jax: GaLore (gradient low-rank projection) as optax transformations.

Three products live here, and data flows one way (app → model / optimizer):

- :mod:`galore_jax.optim`: the optimizer library (jax, optax, chex, numpy only); its public names
  are re-exported here, so ``from galore_jax import galore, galore_adamw`` works.
- :mod:`galore_jax.models`: a Flax NNX Llama with Hugging Face weights in and out.
- :mod:`galore_jax.train`: the training app's pieces (configs, data, steps, checkpoints, sharding).
"""

from galore_jax import optim
from galore_jax.optim import *  # noqa: F401,F403

__all__ = list(optim.__all__)

__version__ = "0.1.0"
