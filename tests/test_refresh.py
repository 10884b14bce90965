"""Fast subspace refresh: randomized / warm-started range finder, SVD algorithm choice, stagger, batched refresh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import (
    Basis,
    ExactRefresh,
    RandomizedRefresh,
    Sides,
    captured_energy,
    galore,
    galore_adamw,
    randomized_svd_basis,
    refresh_offsets,
    svd_basis,
)
from galore_jax.transform import plan_leaves

SIDES = [Sides(True, False), Sides(False, True), Sides(True, True)]


def gapped_grad(key, shape, rank, gap=100.0):
  """A full-rank matrix whose top-`rank` singular values are `gap`× above a decaying tail."""
  *batch, m, n = shape
  d = min(m, n)
  k1, k2 = jax.random.split(key)
  u = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, d)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, d)))[0]
  s = jnp.where(jnp.arange(d) < rank, gap * (1.0 + jnp.arange(d, 0, -1) / d), 1.0 / (1.0 + jnp.arange(d)))
  return (u * s) @ jnp.swapaxes(v, -1, -2)


def projector(q):
  return q @ jnp.swapaxes(q, -1, -2)


def assert_orthonormal(q, atol=1e-5):
  eye = np.broadcast_to(np.eye(q.shape[-1]), (*q.shape[:-2], q.shape[-1], q.shape[-1]))
  np.testing.assert_allclose(jnp.swapaxes(q, -1, -2) @ q, eye, atol=atol)


def assert_same_subspace(a: Basis, b: Basis, atol=1e-3):
  for qa, qb in zip(a, b):
    assert (qa is None) == (qb is None)
    if qa is not None:
      np.testing.assert_allclose(projector(qa), projector(qb), atol=atol)


# ----------------------------------------------------------------------------- the randomized basis


@pytest.mark.parametrize("stabilizer", ["lu", "qr"])
@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (3, 16, 16)])
def test_randomized_basis_is_orthonormal_and_spans_the_exact_subspace(sides, shape, stabilizer):
  g = gapped_grad(jax.random.key(0), shape, rank=4)
  exact = svd_basis(g, 4, sides)
  fast = randomized_svd_basis(g, 4, sides, key=jax.random.key(1), oversampling=4, iterations=1, stabilizer=stabilizer)
  for q in fast:
    if q is not None:
      assert q.shape[-1] == 4
      assert_orthonormal(q)
  assert_same_subspace(fast, exact)


def test_randomized_basis_is_in_singular_vector_order():
  g = gapped_grad(jax.random.key(0), (16, 24), rank=6)
  exact = svd_basis(g, 6, Sides(True, True))
  fast = randomized_svd_basis(g, 6, Sides(True, True), key=jax.random.key(3), oversampling=6, iterations=2)
  # columns agree up to sign, one by one (distinct singular values)
  np.testing.assert_allclose(jnp.abs(jnp.sum(fast.input * exact.input, axis=0)), 1.0, atol=1e-3)
  np.testing.assert_allclose(jnp.abs(jnp.sum(fast.output * exact.output, axis=0)), 1.0, atol=1e-3)
  for sides in (Sides(True, False), Sides(False, True)):  # one side: the Gram-matrix finish
    one = randomized_svd_basis(g, 6, sides, key=jax.random.key(3), oversampling=6, iterations=2)
    q_fast, q_exact = (one.input, exact.input) if sides.input else (one.output, exact.output)
    np.testing.assert_allclose(jnp.abs(jnp.sum(q_fast * q_exact, axis=0)), 1.0, atol=1e-3)


@pytest.mark.parametrize("stabilizer", ["lu", "qr"])
@pytest.mark.parametrize("sides", SIDES)
def test_rank_at_dimension_and_zero_gradient_give_no_nan(sides, stabilizer):
  g = jax.random.normal(jax.random.key(0), (2, 5, 7))
  for grad in (g, jnp.zeros_like(g)):
    basis = randomized_svd_basis(grad, 5, sides, key=jax.random.key(0), oversampling=10, iterations=2,
                                 stabilizer=stabilizer)
    for q in basis:
      if q is not None:
        assert np.all(np.isfinite(q))
        assert_orthonormal(q)
  # rank = min(m, n): the basis spans everything the gradient has
  full = randomized_svd_basis(g, 5, Sides(True, False), key=jax.random.key(0))
  np.testing.assert_allclose(captured_energy(g, full), 1.0, atol=1e-5)


def test_batch_of_keys_matches_single_calls():
  g = jax.random.normal(jax.random.key(0), (3, 10, 14))
  keys = jax.random.split(jax.random.key(7), 3)
  batched = randomized_svd_basis(g, 3, Sides(True, False), key=keys, iterations=0)
  for i in range(3):
    alone = randomized_svd_basis(g[i], 3, Sides(True, False), key=keys[i], iterations=0)
    np.testing.assert_allclose(batched.input[i], alone.input, atol=1e-5)


@pytest.mark.parametrize("sides", SIDES)
def test_randomized_refresh_keeps_column_signs_across_refreshes(sides):
  """Two refreshes of one gradient with different test matrices give the same columns, signs included
  (without alignment about half of them flip), and the first refresh (warm=False) is left alone."""
  g = gapped_grad(jax.random.key(3), (2, 16, 24), 4)
  first = RandomizedRefresh()(g, svd_basis(g, 4, sides), 4, key=jax.random.key(1), warm=False)
  flips = []
  for seed in range(2, 8):
    aligned = RandomizedRefresh()(g, first, 4, key=jax.random.key(seed), warm=True)
    raw = RandomizedRefresh(align=False)(g, first, 4, key=jax.random.key(seed), warm=True)
    for q_first, q_aligned, q_raw in zip(first, aligned, raw):
      if q_first is not None:
        np.testing.assert_allclose(q_aligned, q_first, atol=1e-3)
        np.testing.assert_allclose(jnp.abs(q_raw), jnp.abs(q_first), atol=1e-3)
        flips.append(bool(jnp.any(jnp.sum(q_raw * q_first, axis=-2) < 0)))
  assert any(flips)  # the alignment is doing something
  placeholder = Basis(*(None if q is None else -q for q in first))
  unaligned = RandomizedRefresh()(g, placeholder, 4, key=jax.random.key(1), warm=False)
  for q_first, q in zip(first, unaligned):
    if q is not None:
      np.testing.assert_allclose(q, q_first, atol=1e-6)


def test_warm_start_converges_to_the_exact_subspace():
  # a flat-ish spectrum: a cold range finder without power iterations is poor,
  # repeated warm starts (subspace iteration across refreshes) converge.
  m, n, r = 40, 60, 4
  k1, k2 = jax.random.split(jax.random.key(0))
  u = jnp.linalg.qr(jax.random.normal(k1, (m, m)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (n, m)))[0]
  s = 1.0 / (1.0 + 0.15 * jnp.arange(m))
  g = (u * s) @ v.T
  exact = svd_basis(g, r, Sides(True, False))
  basis = randomized_svd_basis(g, r, Sides(True, False), key=jax.random.key(1), oversampling=2, iterations=0)
  first = float(captured_energy(g, basis) / captured_energy(g, exact))
  for t in range(30):
    basis = randomized_svd_basis(g, r, Sides(True, False), key=jax.random.key(2 + t), oversampling=2,
                                 iterations=0, previous=basis, warm=True)
  last = float(captured_energy(g, basis) / captured_energy(g, exact))
  assert first < 0.99 < last
  assert_same_subspace(basis, exact, atol=1e-2)
  # warm=False ignores the previous basis
  cold = randomized_svd_basis(g, r, Sides(True, False), key=jax.random.key(1), oversampling=2, iterations=0,
                              previous=exact, warm=False)
  again = randomized_svd_basis(g, r, Sides(True, False), key=jax.random.key(1), oversampling=2, iterations=0)
  np.testing.assert_allclose(cold.input, again.input, atol=1e-6)


def test_captured_energy():
  g = gapped_grad(jax.random.key(0), (2, 10, 12), rank=3)
  s = jnp.linalg.svd(g, compute_uv=False)
  exact = svd_basis(g, 3, Sides(True, False))
  np.testing.assert_allclose(captured_energy(g, exact), jnp.sum(s[:, :3] ** 2, -1) / jnp.sum(s ** 2, -1), rtol=1e-5)
  np.testing.assert_allclose(captured_energy(jnp.zeros((4, 5)), Basis(jnp.eye(4, 2), None)), 1.0)


@pytest.mark.parametrize("algorithm", [None, "qr", "jacobi", "polar"])
def test_exact_refresh_algorithms(algorithm):
  g = gapped_grad(jax.random.key(0), (2, 12, 9), rank=3)
  prev = Basis(jnp.zeros((2, 12, 3)), jnp.zeros((2, 9, 3)))
  basis = jax.jit(ExactRefresh(algorithm), static_argnums=2)(g, prev, 3)
  assert_same_subspace(basis, svd_basis(g, 3, Sides(True, True)))


def test_unknown_svd_algorithm_fails_at_construction():
  with pytest.raises(ValueError, match="svd_algorithm"):
    ExactRefresh("magic")
  with pytest.raises(ValueError, match="svd_algorithm"):
    RandomizedRefresh(svd_algorithm="magic")


# ----------------------------------------------------------------------------- inside the transformation


def _params():
  return {
      "attn": {"q": jnp.zeros((2, 12, 12)), "k": jnp.zeros((12, 12))},
      "mlp": {"up": jnp.zeros((12, 20)), "down": jnp.zeros((20, 12))},
      "norm": jnp.zeros(12),
  }


def _grads(t, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(t), len(leaves))
  return treedef.unflatten([
      gapped_grad(k, x.shape, rank=3) if x.ndim >= 2 else jax.random.normal(k, x.shape)
      for k, x in zip(keys, leaves)
  ])


@pytest.mark.parametrize("refresh", ["randomized", "randomized_warm"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_randomized_refresh_in_galore_matches_exact_subspaces(refresh, proj_type):
  params = _params()
  fast, exact = (galore(rank=3, update_proj_gap=2, refresh=r, proj_type=proj_type) for r in (refresh, "svd"))
  sf, se = fast.init(params), exact.init(params)
  for t in range(5):
    g = _grads(t, params)
    _, sf = jax.jit(fast.update)(g, sf)
    _, se = jax.jit(exact.update)(g, se)
    for path in se.bases:
      assert_same_subspace(sf.bases[path], se.bases[path], atol=2e-3)


def test_randomized_refresh_is_deterministic_given_the_step_and_seed():
  params = _params()
  g = _grads(0, params)
  runs = []
  for seed in (0, 0, 1):
    tx = galore(rank=3, update_proj_gap=2, refresh=RandomizedRefresh(iterations=0), refresh_seed=seed)
    runs.append(jax.jit(tx.update)(g, tx.init(params))[1].bases["mlp/up"].input)
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.allclose(runs[0], runs[2])


def test_user_refresh_with_three_arguments_still_works_and_keywords_are_passed_when_asked():
  seen = {}

  def three(grad, previous, rank):
    return svd_basis(grad, rank, Sides(previous.input is not None, previous.output is not None))

  def keyed(grad, previous, rank, *, key, warm):
    seen["key"], seen["warm"] = key.shape, warm.shape
    return three(grad, previous, rank)

  params = _params()
  for fn in (three, keyed):
    tx = galore(rank=3, update_proj_gap=2, refresh=fn)
    jax.jit(tx.update)(_grads(0, params), tx.init(params))
  assert seen["warm"] == ()
  assert seen["key"] in {(), (2,)}


def test_refresh_offsets_are_balanced_and_in_range():
  _, plans, _ = plan_leaves(_params(), rank=3)
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

  params = _params()
  tx = galore(rank=3, update_proj_gap=gap, refresh=counting, stagger=True)
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, plans, _ = plan_leaves(params, rank=3)
  offsets = {p.path: o for p, o in zip(plans, refresh_offsets(plans, gap, True)) if p}
  history = {path: [] for path in offsets}
  steps = 4 * gap + 1
  for t in range(steps):
    calls.append([])
    _, new = step(_grads(t, params), state)
    jax.effects_barrier()
    for path in offsets:
      history[path].append(not np.allclose(new.bases[path][0] if new.bases[path][0] is not None else new.bases[path][1],
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

  def spy(grad, previous, rank, **kw):
    shapes.append(grad.shape)
    return (ExactRefresh() if refresh == "svd" else RandomizedRefresh())(grad, previous, rank, **(kw if refresh != "svd" else {}))

  per_leaf = galore(rank=3, update_proj_gap=2, refresh=refresh)
  batched = galore(rank=3, update_proj_gap=2, refresh=spy, batch_refresh=True)
  g = _grads(0, params)
  a = jax.jit(per_leaf.update)(g, per_leaf.init(params))[1]
  b = jax.jit(batched.update)(g, batched.init(params))[1]
  assert sorted(shapes) == [(4, 12, 12), (12, 20)]  # q (2 layers), k, v stacked; up alone
  for path in a.bases:
    np.testing.assert_allclose(a.bases[path].input, b.bases[path].input, atol=1e-4)


@pytest.mark.parametrize("refresh", ["randomized", "randomized_warm", ExactRefresh("jacobi")])
@pytest.mark.parametrize("stagger", [False, True])
def test_qr_and_svd_only_inside_the_refresh_branch(refresh, stagger):
  from tests.test_galore import _primitive_names

  params = {"attn": {"kernel": jnp.zeros((2, 6, 8))}, "mlp": {"kernel": jnp.zeros((8, 6))}}
  tx = galore_adamw(1e-3, rank=2, update_proj_gap=5, refresh=refresh, stagger=stagger, batch_refresh=True)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  heavy = [(name, inside) for name, inside in _primitive_names(jaxpr)
           if name in ("svd", "qr", "geqrf", "householder_product", "random_bits", "threefry2x32")]
  assert heavy and all(inside for _, inside in heavy), heavy


def test_on_refresh_reset_with_stagger_only_touches_the_refreshed_leaf():
  from galore_jax import project

  params = {"mlp": {"a": jnp.zeros((6, 8)), "b": jnp.zeros((6, 8))}}
  tx = galore(optax.scale_by_adam(b1=0.9), rank=2, update_proj_gap=2, stagger=True, on_refresh="reset",
              refresh="randomized")
  offsets = dict(zip(["a", "b"], [o for o in refresh_offsets(plan_leaves(params, rank=2)[1], 2, True)]))
  assert sorted(offsets.values()) == [0, 1]
  state = tx.init(params)
  step = jax.jit(tx.update)
  g0, g1 = _grads(0, params), _grads(1, params)
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


# ----------------------------------------------------------------------------- adaptive gap


def _count_refreshes(tx, grads_of_step, steps, params):
  calls = []

  state = tx.init(params)
  step = jax.jit(tx.update)
  refreshed = []
  for t in range(steps):
    _, new = step(grads_of_step(t), state)
    refreshed.append({path: not np.array_equal(new.bases[path].input, state.bases[path].input) for path in new.bases})
    state = new
  return refreshed, state


def test_adaptive_gap_grows_while_the_subspace_stays_and_caps():
  from galore_jax import AdaptiveGap

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
  from galore_jax import AdaptiveGap

  params = {"mlp": {"kernel": jnp.zeros((12, 16))}}
  grads = lambda t: {"mlp": {"kernel": gapped_grad(jax.random.key(t), (12, 16), rank=3)}}
  tx = galore(rank=3, update_proj_gap=3, adaptive_gap=AdaptiveGap())
  refreshed, state = _count_refreshes(tx, grads, 10, params)
  assert [t for t, r in enumerate(refreshed) if r["mlp/kernel"]] == [0, 3, 6, 9]


def test_adaptive_gap_state_is_saveable_and_default_state_unchanged():
  from galore_jax import AdaptiveGap, GaLoreState

  params = _params()
  plain = galore(rank=3).init(params)
  assert plain.schedule is None and len(jax.tree.leaves(plain)) == len(jax.tree.leaves(
      GaLoreState(plain.count, plain.bases, plain.inner_state)))
  state = galore(rank=3, adaptive_gap=AdaptiveGap(), stagger=True).init(params)
  assert set(state.schedule) == set(state.bases)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  with pytest.raises(TypeError, match="adaptive_gap"):
    galore(rank=3, adaptive_gap=0.4)


def test_adaptive_gap_with_stagger_keeps_svd_inside_cond():
  from galore_jax import AdaptiveGap
  from tests.test_galore import _primitive_names

  params = _params()
  tx = galore_adamw(1e-3, rank=2, update_proj_gap=5, refresh="randomized", stagger=True, adaptive_gap=AdaptiveGap())
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  heavy = [inside for name, inside in _primitive_names(jaxpr) if name in ("svd", "qr")]
  assert heavy and all(heavy)


# ----------------------------------------------------------------------------- two-stage refresh: batched finish


def _eigh_batch_shapes(jaxpr, found=None):
  """Operand shapes of every ``eigh`` in ``jaxpr`` and its sub-jaxprs (cond branches, loop bodies)."""
  from tests.test_galore import _sub_jaxprs

  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "eigh":
      found.append(tuple(eqn.invars[0].aval.shape))
    for sub in _sub_jaxprs(eqn):
      _eigh_batch_shapes(sub, found)
  return found


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
    g = _grads(t, params)
    states = [jax.jit(tx.update)(g, s)[1] for tx, s in zip(txs, states)]
  for path in states[1].bases:
    np.testing.assert_allclose(states[0].bases[path].input, states[1].bases[path].input, atol=1e-5)
  assert_orthonormal(states[0].bases["attn/q"].input)

  jaxpr = jax.make_jaxpr(txs[0].update)(params, txs[0].init(params)).jaxpr
  assert _eigh_batch_shapes(jaxpr) == [(members_per_batch, 12, 12)]  # one batched eigh per chunk; k = min(3 + 10, 12)


def test_stagger_keeps_one_matrix_at_a_time():
  """With stagger only some members are due on a step: no batched finish over members that are not due."""
  tx = galore(rank=3, update_proj_gap=4, refresh="randomized", stagger=True)
  params = _four_equal_kernels()
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params)).jaxpr
  assert _eigh_batch_shapes(jaxpr) == [(12, 12)]


def test_jacobi_eigh_algorithm_runs_everywhere_and_bad_names_fail_early():
  g = gapped_grad(jax.random.key(3), (16, 24), rank=4)
  prev = Basis(jnp.zeros((16, 4)), None)
  default = RandomizedRefresh()(g, prev, 4, key=jax.random.key(0), warm=False)
  jacobi = jax.jit(lambda g: RandomizedRefresh(eigh_algorithm="jacobi")(g, prev, 4, key=jax.random.key(0),
                                                                       warm=False))(g)
  assert_same_subspace(default, jacobi, atol=1e-4)  # on CPU the same LAPACK eigh; on GPU cuSOLVER's syevj
  with pytest.raises(ValueError, match="eigh_algorithm='qdwh'"):
    RandomizedRefresh(eigh_algorithm="qdwh")
  with pytest.raises(ValueError, match="batch_budget_bytes"):
    RandomizedRefresh(batch_budget_bytes=-1)


def _dot_precisions(jaxpr, found=None):
  """``(output shape, exact)`` of every ``dot_general`` in ``jaxpr``; exact = both operands at ``HIGHEST``."""
  from tests.test_galore import _sub_jaxprs

  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      precision = eqn.params.get("precision")
      exact = isinstance(precision, tuple) and all(p == jax.lax.Precision.HIGHEST for p in precision)
      found.append((tuple(eqn.outvars[0].aval.shape), exact))
    for sub in _sub_jaxprs(eqn):
      _dot_precisions(sub, found)
  return found


@pytest.mark.parametrize("sides", SIDES, ids=["input", "output", "both"])
def test_rayleigh_ritz_products_run_in_full_fp32_and_the_range_finder_at_the_default(sides):
  """On GPU (TF32) and TPU (bf16 passes) the default f32 matmul would blur the Gram matrix's small eigenvalues."""
  g = jnp.ones((40, 56))
  jaxpr = jax.make_jaxpr(lambda g: randomized_svd_basis(g, 6, sides, key=jax.random.key(0)))(g).jaxpr
  dots = _dot_precisions(jaxpr)
  k = 16  # rank 6 + oversampling 10
  found, other = (40, 56) if sides.input else (56, 40)
  range_finder = [((found, k), False), ((other, k), False), ((found, k), False)]
  if sides.input and sides.output:
    rayleigh_ritz = [((other, k), True), ((found, 6), True), ((other, 6), True)]  # Aᵀ Q; Q U_b; Q₂ V_b
  else:
    rayleigh_ritz = [((k, other), True), ((k, k), True), ((found, 6), True)]  # B = Qᵀ A; B Bᵀ; Q U_b
  assert dots == range_finder + rayleigh_ritz
