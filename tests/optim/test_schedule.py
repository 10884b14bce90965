"""When bases refresh: stagger offsets, batched and looped refreshes inside one cond per group, the adaptive gap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_orthonormal,
    gapped_grad,
    gapped_grads,
    mixed_params,
    operand_shapes,
    primitive_names,
)

from galore_jax import (
    AdaptiveGap,
    Basis,
    ExactRefresh,
    GaLoreState,
    RandomizedRefresh,
    Sides,
    galore,
    galore_adamw,
    plan_leaves,
    project,
    refresh_offsets,
    svd_basis,
)
from galore_jax.optim.refresh import accepted_keywords, resolve

def test_refresh_offsets_are_balanced_and_in_range():
  _, plans, _ = plan_leaves(mixed_params(), rank=3)
  assert refresh_offsets(plans, 10, stagger=False) == [0 if p else None for p in plans]
  offsets = refresh_offsets(plans, 10, stagger=True)
  used = [o for o in offsets if o is not None]
  assert len(used) == 4 and len(set(used)) == 4 and all(0 <= o < 10 for o in used)
  assert refresh_offsets(plans, 1, stagger=True) == [0 if p else None for p in plans]
  assert sorted(o for o in refresh_offsets(plans, 2, stagger=True) if o is not None) == [0, 0, 1, 1]


@pytest.mark.parametrize("gap", [3, 5])
def test_stagger_refreshes_each_leaf_on_step_0_then_once_per_gap(gap):
  calls = []

  def counting(grad, previous, rank):
    jax.debug.callback(lambda shape: calls[-1].append(tuple(shape)), jnp.array(grad.shape))
    return svd_basis(grad, rank, Sides(previous.input is not None, previous.output is not None))

  params = mixed_params()
  tx = galore(rank=3, update_proj_gap=gap, refresh=counting, stagger=True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, plans, _ = plan_leaves(params, rank=3)
  offsets = {p.path: o for p, o in zip(plans, refresh_offsets(plans, gap, True)) if p}
  history = {path: [] for path in offsets}
  steps = 4 * gap + 1
  for t in range(steps):
    calls.append([])
    _, new = step(gapped_grads(t, params), state)
    jax.effects_barrier()
    for path in offsets:
      history[path].append(not np.allclose(
          new.bases[path][0] if new.bases[path][0] is not None else new.bases[path][1],
          state.bases[path][0] if state.bases[path][0] is not None else state.bases[path][1]))
    state = new
  assert len(calls[0]) == 4  # every leaf on step 0
  for path, changed in history.items():
    assert changed[0]
    for start in range(1, steps - gap + 1):  # every window of `gap` steps after the first
      assert sum(changed[start:start + gap]) == 1, (path, changed)
    assert [t for t in range(1, steps) if changed[t]] == [t for t in range(1, steps) if (t - offsets[path]) % gap == 0]
  # no step after the first refreshes everything
  assert max(len(c) for c in calls[1:]) < 4
  assert sum(len(c) for c in calls[1:]) == sum(sum(h[1:]) for h in history.values())


@pytest.mark.parametrize("refresh", ["svd", "randomized"])
def test_batched_refresh_gives_the_same_bases_as_per_leaf(refresh):
  params = {"attn": {"q": jnp.zeros((2, 12, 12)), "k": jnp.zeros((12, 12)), "v": jnp.zeros((12, 12))},
            "mlp": {"up": jnp.zeros((12, 20))}}
  shapes = []

  method = resolve(refresh)

  def spy(grad, previous, rank, **kw):  # is given every keyword a refresh may take; passes on what method takes
    shapes.append(grad.shape)
    return method(grad, previous, rank, **{k: v for k, v in kw.items() if k in accepted_keywords(method)})

  per_leaf = galore(rank=3, update_proj_gap=2, refresh=refresh)
  batched = galore(rank=3, update_proj_gap=2, refresh=spy, batch_refresh=True)
  g = gapped_grads(0, params)
  a = jax.jit(per_leaf.update)(g, per_leaf.init(params))[1]
  b = jax.jit(batched.update)(g, batched.init(params))[1]
  assert sorted(shapes) == [(4, 12, 12), (12, 20)]  # q (2 layers), k, v stacked; up alone
  for path in a.bases:
    np.testing.assert_allclose(a.bases[path].input, b.bases[path].input, atol=1e-4)


@pytest.mark.parametrize("refresh", ["randomized", "randomized_warm", ExactRefresh("jacobi")])
@pytest.mark.parametrize("stagger", [False, True])
def test_qr_and_svd_only_inside_the_refresh_branch(refresh, stagger):
  params = {"attn": {"kernel": jnp.zeros((2, 6, 8))}, "mlp": {"kernel": jnp.zeros((8, 6))}}
  tx = galore_adamw(1e-3, rank=2, update_proj_gap=5, refresh=refresh, stagger=stagger, batch_refresh=True)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  heavy = [(name, inside) for name, inside in primitive_names(jaxpr)
           if name in ("svd", "qr", "geqrf", "householder_product", "random_bits", "threefry2x32")]
  assert heavy and all(inside for _, inside in heavy), heavy


def test_on_refresh_reset_with_stagger_only_touches_the_refreshed_leaf():
  params = {"mlp": {"a": jnp.zeros((6, 8)), "b": jnp.zeros((6, 8))}}
  tx = galore(optax.scale_by_adam(b1=0.9), rank=2, update_proj_gap=2, stagger=True, on_refresh="reset",
              refresh="randomized")
  offsets = dict(zip(["a", "b"], [o for o in refresh_offsets(plan_leaves(params, rank=2)[1], 2, True)]))
  assert sorted(offsets.values()) == [0, 1]
  state = tx.init(params)
  step = jax.jit(tx.update)
  g0, g1 = gapped_grads(0, params), gapped_grads(1, params)
  _, s0 = step(g0, state)
  _, s1 = step(g1, s0)
  for name, offset in offsets.items():
    path = f"mlp/{name}"
    r0 = project(g0["mlp"][name], s0.bases[path])
    r1 = project(g1["mlp"][name], s1.bases[path])
    mu = s1.inner_state.mu["mlp"][name]
    if offset == 1:  # refreshed on step 1: new basis, moments reset before the update
      assert not np.allclose(s1.bases[path].input, s0.bases[path].input)
      np.testing.assert_allclose(mu, 0.1 * r1, atol=1e-5)
    else:  # not refreshed: basis and moments carried on
      np.testing.assert_array_equal(s1.bases[path].input, s0.bases[path].input)
      np.testing.assert_allclose(mu, 0.9 * 0.1 * r0 + 0.1 * r1, atol=1e-5)


def _count_refreshes(tx, grads_of_step, steps, params):
  state = tx.init(params)
  step = jax.jit(tx.update)
  refreshed = []
  for t in range(steps):
    _, new = step(grads_of_step(t), state)
    refreshed.append({path: not np.array_equal(new.bases[path].input, state.bases[path].input) for path in new.bases})
    state = new
  return refreshed, state


def test_adaptive_gap_grows_while_the_subspace_stays_and_caps():
  params = {"mlp": {"kernel": jnp.zeros((12, 16))}}
  g = gapped_grad(jax.random.key(0), (12, 16), rank=3)
  # the same subspace every step, different scaling/sign so the bases' entries still change on a refresh
  grads = lambda t: {"mlp": {"kernel": g * (1.0 + 0.1 * t) + 1e-3 * jax.random.normal(jax.random.key(t), g.shape)}}
  tx = galore(rank=3, update_proj_gap=2, adaptive_gap=AdaptiveGap(threshold=0.4, max_gap=8))
  refreshed, state = _count_refreshes(tx, grads, 25, params)
  steps = [t for t, r in enumerate(refreshed) if r["mlp/kernel"]]
  assert steps == [0, 2, 6, 14, 22]
  np.testing.assert_array_equal(state.schedule["mlp/kernel"], [8, 30])


def test_adaptive_gap_stays_at_the_base_gap_when_the_subspace_moves():
  params = {"mlp": {"kernel": jnp.zeros((12, 16))}}
  grads = lambda t: {"mlp": {"kernel": gapped_grad(jax.random.key(t), (12, 16), rank=3)}}
  tx = galore(rank=3, update_proj_gap=3, adaptive_gap=AdaptiveGap())
  refreshed, state = _count_refreshes(tx, grads, 10, params)
  assert [t for t, r in enumerate(refreshed) if r["mlp/kernel"]] == [0, 3, 6, 9]


def test_adaptive_gap_state_is_saveable_and_default_state_unchanged():
  params = mixed_params()
  plain = galore(rank=3).init(params)
  assert plain.schedule is None and len(jax.tree.leaves(plain)) == len(jax.tree.leaves(
      GaLoreState(plain.count, plain.bases, plain.inner_state)))
  state = galore(rank=3, adaptive_gap=AdaptiveGap(), stagger=True).init(params)
  assert set(state.schedule) == set(state.bases)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  with pytest.raises(TypeError, match="adaptive_gap"):
    galore(rank=3, adaptive_gap=0.4)


def test_adaptive_gap_with_stagger_keeps_svd_inside_cond():
  params = mixed_params()
  tx = galore_adamw(1e-3, rank=2, update_proj_gap=5, refresh="randomized", stagger=True, adaptive_gap=AdaptiveGap())
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  heavy = [inside for name, inside in primitive_names(jaxpr) if name in ("svd", "qr")]
  assert heavy and all(heavy)


def _four_equal_kernels():
  return {"attn": {name: jnp.zeros((12, 20)) for name in ("q", "k", "v", "o")}}


@pytest.mark.parametrize("members_per_batch", [1, 2, 4])
def test_sketched_group_refresh_matches_one_matrix_at_a_time(members_per_batch):
  """Loop-sketch-then-batched-finish gives the bases of refreshing each matrix on its own, in any chunking."""
  params = _four_equal_kernels()
  one = RandomizedRefresh()
  sketch = one.sketch(jnp.zeros((12, 20)), Basis(jnp.zeros((12, 3)), None), 3)
  per_member = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(sketch))
  batched = RandomizedRefresh(batch_budget_bytes=members_per_batch * per_member)

  def single(grad, previous, rank, *, key, warm):  # no sketch/finish: refreshed one matrix at a time
    return one(grad, previous, rank, key=key, warm=warm)

  txs = [galore(rank=3, update_proj_gap=2, refresh=r) for r in (batched, single)]
  states = [tx.init(params) for tx in txs]
  for t in range(3):  # step 0 (cold) and step 2 (warm: signs aligned to the previous bases)
    g = gapped_grads(t, params)
    states = [jax.jit(tx.update)(g, s)[1] for tx, s in zip(txs, states)]
  for path in states[1].bases:
    np.testing.assert_allclose(states[0].bases[path].input, states[1].bases[path].input, atol=1e-5)
  assert_orthonormal(states[0].bases["attn/q"].input)

  jaxpr = jax.make_jaxpr(txs[0].update)(params, txs[0].init(params)).jaxpr
  # one batched eigh per chunk (k = min(3 + 10, 12)) off CPU; on CPU a loop over the chunk (tests/optim/test_linalg.py)
  batched = [(members_per_batch, 12, 12)]
  assert operand_shapes(jaxpr, "eigh") == (batched if members_per_batch == 1 else [(12, 12)] + batched)


def test_stagger_keeps_one_matrix_at_a_time():
  """With stagger only some members are due on a step: no batched finish over members that are not due."""
  tx = galore(rank=3, update_proj_gap=4, refresh="randomized", stagger=True)
  params = _four_equal_kernels()
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params)).jaxpr
  assert operand_shapes(jaxpr, "eigh") == [(12, 12)]
