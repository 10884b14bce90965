"""The reference's Adam (eps before bias correction) and the bias correction applied on its own."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from galore_jax import scale_by_adam_hf, scale_by_bias_correction


def _updates(tx, grads):
  state, out = tx.init(grads[0]), []
  for g in grads:
    u, state = tx.update(g, state)
    out.append(u)
  return out


@pytest.mark.parametrize("b1,b2", [(0.9, 0.999), (0.5, 0.9)])
def test_bias_correction_split_off_equals_the_whole_step(b1, b2):
  grads = [{"w": jax.random.normal(jax.random.key(t), (3, 5))} for t in range(6)]
  whole = _updates(scale_by_adam_hf(b1, b2), grads)
  split = _updates(optax.chain(scale_by_adam_hf(b1, b2, bias_correction=False), scale_by_bias_correction(b1, b2)),
                   grads)
  chex.assert_trees_all_close(split, whole, rtol=1e-6, atol=0)
  normalized = _updates(scale_by_adam_hf(b1, b2, bias_correction=False), grads)
  t = 3  # step t + 1: the factor sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)), in fp32 as the reference's step size
  factor = jnp.sqrt(1 - b2 ** jnp.float32(t + 1)) / (1 - b1 ** jnp.float32(t + 1))
  chex.assert_trees_all_close(jax.tree.map(lambda u: factor * u, normalized[t]), whole[t], rtol=1e-6, atol=0)
