"""Refresh methods: the randomized range finder, the exact SVD's algorithms, and how galore calls a refresh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_orthonormal,
    assert_same_subspace,
    dot_precisions,
    gapped_grad,
    gapped_grads,
    mixed_params,
)

from galore_jax import (
    Basis,
    ExactRefresh,
    RandomizedRefresh,
    Sides,
    captured_energy,
    galore,
    randomized_svd_basis,
    svd_basis,
)

SIDES = [Sides(True, False), Sides(False, True), Sides(True, True)]


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
  refresh = jax.jit(RandomizedRefresh(), static_argnums=2, static_argnames="warm")
  unaligned_refresh = jax.jit(RandomizedRefresh(align=False), static_argnums=2, static_argnames="warm")
  first = refresh(g, svd_basis(g, 4, sides), 4, key=jax.random.key(1), warm=False)
  flips = []
  for seed in range(2, 8):
    aligned = refresh(g, first, 4, key=jax.random.key(seed), warm=True)
    raw = unaligned_refresh(g, first, 4, key=jax.random.key(seed), warm=True)
    for q_first, q_aligned, q_raw in zip(first, aligned, raw):
      if q_first is not None:
        np.testing.assert_allclose(q_aligned, q_first, atol=1e-3)
        np.testing.assert_allclose(jnp.abs(q_raw), jnp.abs(q_first), atol=1e-3)
        flips.append(bool(jnp.any(jnp.sum(q_raw * q_first, axis=-2) < 0)))
  assert any(flips)  # the alignment is doing something
  placeholder = Basis(*(None if q is None else -q for q in first))
  unaligned = refresh(g, placeholder, 4, key=jax.random.key(1), warm=False)
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


@pytest.mark.parametrize("refresh", ["randomized", "randomized_warm"])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_randomized_refresh_in_galore_matches_exact_subspaces(refresh, proj_type):
  params = mixed_params()
  fast, exact = (galore(rank=3, update_proj_gap=2, refresh=r, proj_type=proj_type) for r in (refresh, "svd"))
  sf, se = fast.init(params), exact.init(params)
  for t in range(5):
    g = gapped_grads(t, params)
    _, sf = jax.jit(fast.update)(g, sf)
    _, se = jax.jit(exact.update)(g, se)
    for path in se.bases:
      assert_same_subspace(sf.bases[path], se.bases[path], atol=2e-3)


def test_randomized_refresh_is_deterministic_given_the_step_and_seed():
  params = mixed_params()
  g = gapped_grads(0, params)
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

  params = mixed_params()
  for fn in (three, keyed):
    tx = galore(rank=3, update_proj_gap=2, refresh=fn)
    jax.jit(tx.update)(gapped_grads(0, params), tx.init(params))
  assert seen["warm"] == ()
  assert seen["key"] in {(), (2,)}


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


@pytest.mark.parametrize("sides", SIDES, ids=["input", "output", "both"])
def test_rayleigh_ritz_products_run_in_full_fp32_and_the_range_finder_at_the_default(sides):
  """On GPU (TF32) and TPU (bf16 passes) the default f32 matmul would blur the Gram matrix's small eigenvalues."""
  g = jnp.ones((40, 56))
  jaxpr = jax.make_jaxpr(lambda g: randomized_svd_basis(g, 6, sides, key=jax.random.key(0)))(g).jaxpr
  dots = dot_precisions(jaxpr)
  k = 16  # rank 6 + oversampling 10
  found, other = (40, 56) if sides.input else (56, 40)
  range_finder = [((found, k), False), ((other, k), False), ((found, k), False)]
  if sides.input and sides.output:
    rayleigh_ritz = [((other, k), True), ((found, 6), True), ((other, 6), True)]  # Aᵀ Q; Q U_b; Q₂ V_b
  else:
    rayleigh_ritz = [((k, other), True), ((k, k), True), ((found, 6), True)]  # B = Qᵀ A; B Bᵀ; Q U_b
  assert dots == range_finder + rayleigh_ritz
