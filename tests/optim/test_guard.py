"""The ``finite`` contract (galore_jax.optim.guard): a step told it is not finite keeps every state leaf bit for bit,
refreshing nothing; a finite one is bit-identical to the call without ``finite``; and the select inside the
optimizer leaves XLA no old moment to copy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mixed_params

import galore_jax
from galore_jax.optim import guard

ALL_MATRICES = lambda path, leaf: jnp.ndim(leaf) >= 2
LOW_RANK = dict(rank=4, update_proj_gap=2, target=ALL_MATRICES)

OPTIMIZERS = {
    "galore_adamw": lambda: galore_jax.galore_adamw(1e-2, weight_decay=0.1, **LOW_RANK),
    "galore_adamw bf16 moments": lambda: galore_jax.galore_adamw(1e-2, moment_dtype=jnp.bfloat16, **LOW_RANK),
    "galore_adamw_8bit": lambda: galore_jax.galore_adamw_8bit(1e-2, weight_decay=0.1, min_8bit_size=16,
                                                              block_size=256, **LOW_RANK),
    "adam_8bit (full rank)": lambda: guard.chain(galore_jax.scale_by_adam_8bit(min_8bit_size=16),
                                                 optax.scale_by_learning_rate(1e-2)),
    "adafactor_hf (full rank)": lambda: guard.chain(galore_jax.scale_by_adafactor_hf(beta1=0.9),
                                                    optax.scale_by_learning_rate(1e-2)),
    "galore_adafactor": lambda: galore_jax.galore_adafactor(1e-2, weight_decay=0.1, beta1=0.9, **LOW_RANK),
    "fira_adamw": lambda: galore_jax.fira_adamw(1e-2, **LOW_RANK),
    "apollo_adamw": lambda: galore_jax.apollo_adamw(1e-2, **LOW_RANK),
    "apollo_mini": lambda: galore_jax.apollo_mini(1e-2, update_proj_gap=2, target=ALL_MATRICES),
    "golore_adamw": lambda: galore_jax.golore_adamw(1e-2, switch_step=1, **LOW_RANK),
    "q_galore_adamw (int4 bases)": lambda: galore_jax.q_galore_adamw(1e-2, rank=4, update_proj_gap=2,
                                                                     basis_group_size=4, target=ALL_MATRICES),
    "galore, adaptive gap, randomized": lambda: guard.chain(galore_jax.galore(
        galore_jax.scale_by_adam_hf(), refresh="randomized", adaptive_gap=galore_jax.AdaptiveGap(), **LOW_RANK)),
    "galore around optax.scale_by_adam": lambda: guard.chain(galore_jax.galore(optax.scale_by_adam(), **LOW_RANK),
                                                             optax.scale_by_learning_rate(1e-2)),
}


def grads_at(t, params):
  keys = jax.random.split(jax.random.key(t), len(jax.tree.leaves(params)))
  leaves = [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def assert_bit_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def two_steps(tx, params):
  """The state after two finite steps: the next one (count 2, gap 2) is a refresh step."""
  state = tx.init(params)
  for t in range(2):
    _, state = tx.update(grads_at(t, params), state, params, finite=jnp.bool_(True))
  return state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_that_is_not_finite_keeps_the_state_bit_for_bit(name):
  """At a refresh step, with NaN gradients: bases, moments, counts and schedule all as they were."""
  tx, params = OPTIMIZERS[name](), mixed_params()
  assert guard.honours_finite(tx)
  state = two_steps(tx, params)
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads_at(2, params))
  _, kept = jax.jit(functools.partial(tx.update, finite=jnp.bool_(False)))(nan, state, params)
  assert_bit_equal(kept, state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_finite_step_is_the_step_without_the_guard(name):
  tx, params = OPTIMIZERS[name](), mixed_params()
  state = two_steps(tx, params)
  grads = grads_at(2, params)
  guarded = jax.jit(functools.partial(tx.update, finite=jnp.bool_(True)))(grads, state, params)
  assert_bit_equal(guarded, jax.jit(tx.update)(grads, state, params))


def test_a_member_that_does_not_honour_finite_has_its_state_selected():
  """optax.scale_by_adam knows nothing of ``finite``: the chain keeps its state by selecting after it."""
  params = {"w": jnp.ones((3, 2))}
  plain = optax.scale_by_adam()
  tx = guard.chain(plain, optax.scale_by_learning_rate(1e-2))
  assert not guard.honours_finite(plain) and guard.honours_finite(tx)
  state = tx.init(params)
  _, moved = tx.update({"w": jnp.ones((3, 2))}, state, params, finite=jnp.bool_(True))
  _, kept = tx.update({"w": jnp.ones((3, 2))}, state, params, finite=jnp.bool_(False))
  assert int(moved[0].count) == 1 and float(moved[0].mu["w"][0, 0]) > 0
  assert_bit_equal(kept, state)


def test_chain_keeps_optax_chain_state_and_updates():
  params = mixed_params()
  members = lambda: (galore_jax.galore(galore_jax.scale_by_adam_hf(), **LOW_RANK), optax.scale_by_learning_rate(0.1))
  ours, theirs = guard.chain(*members()), optax.chain(*members())
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  for t in range(3):
    u_ours, s_ours = ours.update(grads_at(t, params), s_ours, params)
    u_theirs, s_theirs = theirs.update(grads_at(t, params), s_theirs, params)
    assert_bit_equal((u_ours, s_ours), (u_theirs, s_theirs))


STATES = {
    "fp32 moments": lambda: galore_jax.galore_adamw(1e-2, rank=4, target=ALL_MATRICES, moment_dtype=jnp.float32),
    "bf16 moments": lambda: galore_jax.galore_adamw(1e-2, rank=4, target=ALL_MATRICES, moment_dtype=jnp.bfloat16),
    # 8-bit low-rank moments of "w" (4 x 48) and full-rank ones of "embed"
    "8-bit moments": lambda: galore_jax.galore_adamw_8bit(1e-2, rank=4, min_8bit_size=16,
                                                          target=lambda path, leaf: "w" in jax.tree_util.keystr(path)),
    "adafactor first moment": lambda: galore_jax.galore_adafactor(1e-2, beta1=0.9, rank=4, target=ALL_MATRICES),
}


def step_temporaries(guard_by: str, states: str) -> int:
  """XLA's temporary bytes for a GaLore step with ``guard_by`` ``"none"`` (no skipping), ``"inside"`` (``finite``
  passed to the optimizer) or ``"after"`` (new params and state selected after an unguarded update)."""
  tx = STATES[states]()
  params = {"w": jnp.ones((64, 48)), "embed": jnp.ones((48, 64)), "norm": jnp.ones(48)}

  def step(params, state, grads):
    ok = jnp.all(jnp.isfinite(grads["w"]))
    if guard_by == "after":
      updates, new_state = tx.update(grads, state, params)
      return guard.keep_unless(ok, (optax.apply_updates(params, updates), new_state), (params, state))
    ok = ok if guard_by == "inside" else None
    updates, state = guard.update(tx, grads, state, params, finite=ok)
    return guard.keep_unless(ok, optax.apply_updates(params, updates), params), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("states", STATES)
def test_skipping_inside_the_optimizer_costs_no_memory(states):
  """Selected after the update, the old moments are read by the update and overwritten by the select: XLA keeps a
  copy of them (fp32) or a buffer of the new ones (bf16, 8-bit codes). Selected inside, before the update (fp32,
  bf16) or before the nearest-code search (8-bit), each old moment is read where it is overwritten: XLA's
  temporaries are at most the unguarded step's."""
  assert step_temporaries("after", states) > step_temporaries("none", states)
  assert step_temporaries("inside", states) <= step_temporaries("none", states)
