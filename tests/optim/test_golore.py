"""GoLore (golore_adamw, GoLoreRefresh): exact SVD bases before the switch step, Haar-random orthonormal ones
from it on, the first moment carried into each new basis and the second kept (the reference's AdamW)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import Basis, GoLoreRefresh, galore, galore_adamw, golore_adamw, scale_by_adam_hf
from galore_jax.optim.refresh import random_orthonormal

GAP, RANK, SWITCH = 2, 2, 4  # refreshes at 0, 2 (SVD), 4, 6 (random)
SHAPE = (6, 10)  # std projects the input side: bases [6, 2]


def grads(steps, seed=0, shape=SHAPE, leaves=("a", "b")):
  rng = np.random.default_rng(seed)
  return [{name: {"attn": jnp.asarray(rng.normal(size=shape), jnp.float32)} for name in leaves} for _ in range(steps)]


def run(tx, gs):
  """The GaLore state after each step (the first element of the chain's state)."""
  state = tx.init(jax.tree.map(jnp.zeros_like, gs[0]))
  update = jax.jit(tx.update)
  states = []
  for g in gs:
    _, state = update(g, state, jax.tree.map(jnp.zeros_like, g))
    states.append(state[0])
  return states


def bases(states, leaf="a/attn"):
  return [np.asarray(s.bases[leaf].input) for s in states]


def golore(**kw):
  return golore_adamw(1e-2, switch_step=SWITCH, rank=RANK, update_proj_gap=GAP, target=".*", **kw)


def test_before_switch_the_bases_are_galores_svd_bases():
  gs = grads(SWITCH)
  ours = bases(run(golore(), gs))
  svd = bases(run(galore_adamw(1e-2, rank=RANK, update_proj_gap=GAP, target=".*"), gs))
  for t in range(SWITCH):
    np.testing.assert_array_equal(ours[t], svd[t])


def test_after_switch_the_bases_are_orthonormal_and_not_the_svd_ones():
  gs = grads(SWITCH + 2 * GAP)
  states = run(golore(), gs)
  svd = bases(run(galore_adamw(1e-2, rank=RANK, update_proj_gap=GAP, target=".*"), gs))
  for t in (SWITCH, SWITCH + GAP):
    q = bases(states)[t]
    np.testing.assert_allclose(q.T @ q, np.eye(RANK), atol=1e-5)
    overlap = np.sum((q.T @ svd[t]) ** 2) / RANK  # 1 = the same subspace
    assert overlap < 0.9
  ours = bases(states)
  assert not np.allclose(ours[SWITCH], ours[SWITCH + GAP])  # a new draw at each refresh
  np.testing.assert_array_equal(ours[SWITCH], ours[SWITCH + 1])  # kept between refreshes
  assert not np.allclose(ours[SWITCH], bases(states, "b/attn")[SWITCH])  # leaves draw apart


def test_random_bases_are_a_function_of_seed_step_and_leaf():
  gs, other = grads(SWITCH + 1), grads(SWITCH + 1, seed=1)
  first, again = run(golore(), gs), run(golore(), other)  # other gradients: the random draw does not read them
  np.testing.assert_array_equal(bases(first)[SWITCH], bases(again)[SWITCH])
  reseeded = run(golore(refresh_seed=1), gs)
  assert not np.allclose(bases(first)[SWITCH], bases(reseeded)[SWITCH])


def test_stacked_leaf_draws_one_basis_per_matrix():
  g = jnp.asarray(np.random.default_rng(0).normal(size=(3, *SHAPE)), jnp.float32)
  tx = golore_adamw(1e-2, switch_step=0, rank=RANK, update_proj_gap=GAP, target=".*")
  _, state = tx.update({"attn": g}, tx.init({"attn": g}), {"attn": g})
  q = np.asarray(state[0].bases["attn"].input)
  assert q.shape == (3, SHAPE[0], RANK)
  np.testing.assert_allclose(np.einsum("bdr,bds->brs", q, q), np.broadcast_to(np.eye(RANK), (3, RANK, RANK)),
                             atol=1e-5)
  assert not np.allclose(q[0], q[1])


def test_haar_moments():
  """Over many draws each entry has E[q] = 0, E[q²] = 1/d, E[q⁴] = 3/(d(d+2)) (d = 6, the Haar values)."""
  d, r, draws = 6, 2, 20000
  q = np.asarray(random_orthonormal(jax.random.split(jax.random.key(0), draws), (draws, d, r)), np.float64)
  se2 = np.std(q ** 2, axis=0) / np.sqrt(draws)
  np.testing.assert_allclose(np.mean(q, axis=0), 0.0, atol=5 * np.sqrt(1 / d / draws))
  np.testing.assert_allclose(np.mean(q ** 2, axis=0), 1 / d, atol=float(5 * se2.max()))
  np.testing.assert_allclose(np.mean(q ** 4, axis=0), 3 / (d * (d + 2)), rtol=0.1)


def test_first_moment_carried_second_kept():
  """At a refresh: mu ← b1·(Q_newᵀ Q_old) mu + (1-b1) R and nu ← b2·nu + (1-b2) R², R = Q_newᵀ G (closed form)."""
  b1, b2 = 0.9, 0.999
  gs = [{"attn": g["a"]["attn"]} for g in grads(SWITCH + 1)]
  tx = optax.chain(galore(scale_by_adam_hf(b1, b2), rank=RANK, update_proj_gap=GAP, target=".*",
                          refresh=GoLoreRefresh(SWITCH), on_refresh="project_first"))
  states = run(tx, gs)
  for t in (GAP, SWITCH):  # an SVD refresh and the first random one
    before, after = states[t - 1], states[t]
    q_old, q_new = before.bases["attn"].input, after.bases["attn"].input
    r = q_new.T @ gs[t]["attn"]
    mu = b1 * (q_new.T @ q_old) @ before.inner_state.mu["attn"] + (1 - b1) * r
    nu = b2 * before.inner_state.nu["attn"] + (1 - b2) * r * r
    np.testing.assert_allclose(after.inner_state.mu["attn"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.inner_state.nu["attn"], nu, rtol=1e-5, atol=1e-7)


def test_golore_refresh_without_step_is_the_exact_svd():
  g = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  previous = Basis(input=jnp.zeros((SHAPE[0], RANK)), output=None)
  u = np.linalg.svd(np.asarray(g))[0][:, :RANK]
  q = np.asarray(GoLoreRefresh(0)(g, previous, RANK).input)
  np.testing.assert_allclose(np.abs(q.T @ u), np.eye(RANK), atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_bad_switch_step(bad):
  with pytest.raises(ValueError, match="switch_step"):
    golore_adamw(1e-2, switch_step=bad)


def test_refresh_is_golores_own():
  with pytest.raises(ValueError, match="refresh"):
    golore_adamw(1e-2, switch_step=1, refresh="randomized")
