"""The exact refresh by the Gram matrix's eigenvectors (``refresh="gram"``) against ``jnp.linalg.svd``.

Same subspace, energy and orthonormality as the direct SVD on random, low-rank-plus-noise, tall, wide, square
and stacked gradients; no NaN at extreme scales or on zero / rank-deficient gradients; what the squared
condition number costs; and the executors' batched, looped and two-stage paths agree.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dot_precisions, mixed_params, operand_shapes, projector

from galore_jax import (
    GRAM_DEFLATIONS,
    Basis,
    ExactRefresh,
    Sides,
    captured_energy,
    galore,
    gram_basis,
    gram_sketch,
    svd_basis,
)
from galore_jax.optim import refresh as refresh_lib

SIDES = {"input": Sides(True, False), "output": Sides(False, True), "both": Sides(True, True)}
SHAPES = {"tall": (14, 9), "wide": (9, 14), "square": (11, 11), "stacked": (3, 8, 13)}
RANK = 3


def random_grad(key, shape):
  return jax.random.normal(key, shape)


def low_rank_plus_noise(key, shape, rank=RANK, noise=1e-2):
  """A rank-``rank`` signal with singular values 4, 2, 1 (well above the noise) plus Gaussian noise."""
  *batch, m, n = shape
  k1, k2, k3 = jax.random.split(key, 3)
  u = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, rank)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, rank)))[0]
  s = 4.0 * 2.0 ** -jnp.arange(rank)
  return (u * s) @ jnp.swapaxes(v, -1, -2) + noise * jax.random.normal(k3, shape)


KINDS = {"random": random_grad, "low_rank_plus_noise": low_rank_plus_noise}


def previous(shape, rank, sides) -> Basis:
  """A placeholder basis with ``sides``, as the transformation passes it."""
  *batch, m, n = shape
  return Basis(jnp.zeros((*batch, m, rank)) if sides.input else None,
               jnp.zeros((*batch, n, rank)) if sides.output else None)


def assert_orthonormal(q, atol=2e-6):
  eye = jnp.broadcast_to(jnp.eye(q.shape[-1]), (*q.shape[:-2], q.shape[-1], q.shape[-1]))
  chex.assert_trees_all_close(jnp.swapaxes(q, -1, -2) @ q, eye, atol=atol)


def projector_gap(a, b) -> float:
  return float(jnp.max(jnp.abs(projector(a) - projector(b))))


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_same_subspace_energy_and_orthonormal_columns_as_the_svd(kind, shape, side):
  shape, sides = SHAPES[shape], SIDES[side]
  g = KINDS[kind](jax.random.key(0), shape)
  gram, exact = gram_basis(g, RANK, sides), svd_basis(g, RANK, sides)
  chex.assert_trees_all_equal_shapes(gram, exact)
  for q_gram, q_exact in zip(gram, exact):
    if q_gram is not None:
      chex.assert_tree_all_finite(q_gram)
      assert_orthonormal(q_gram)
      # random matrices have relative singular-value gaps of ~10%: the Gram's error eps·σ₁²/(σ_r² - σ_{r+1}²)
      # stays ~1e-6; 1e-4 leaves room for LAPACK's own error on the SVD side
      assert projector_gap(q_gram, q_exact) <= 1e-4
  for s in sides._fields:  # each side's energy on its own: ≥ 0.9999 of the exact basis's
    if getattr(sides, s):
      one = lambda b: Basis(*(q if f == s else None for f, q in zip(Basis._fields, b)))
      ratio = captured_energy(g, one(gram)) / captured_energy(g, one(exact))
      assert float(jnp.min(ratio)) >= 0.9999


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_two_stages_give_the_one_call_bases_and_the_sign_convention(shape, side):
  shape, sides = SHAPES[shape], SIDES[side]
  g = low_rank_plus_noise(jax.random.key(1), shape)
  refresh, prev = ExactRefresh(), previous(shape, RANK, sides)
  whole = refresh(g, prev, RANK)
  staged = refresh.finish(refresh.sketch(g, prev, RANK), prev, RANK)
  chex.assert_trees_all_close(staged, whole, atol=0)
  chex.assert_trees_all_close(jax.jit(refresh, static_argnums=2)(g, prev, RANK), whole, atol=1e-6)
  chex.assert_trees_all_equal(refresh(g, prev, RANK), whole)  # deterministic
  if sides.input and sides.output:  # the long side pairs with the short one: u_iᵀ G v_i = σ_i ≥ 0
    sigma = jnp.einsum("...mr,...mn,...nr->...r", whole.input, g, whole.output)
    chex.assert_trees_all_close(sigma, jnp.linalg.svd(g, compute_uv=False)[..., :RANK], rtol=1e-5)
  else:  # one side: each column's largest-magnitude entry is positive
    q = whole.input if sides.input else whole.output
    peak = jnp.take_along_axis(q, jnp.argmax(jnp.abs(q), axis=-2, keepdims=True), axis=-2)
    assert bool(jnp.all(peak > 0))


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_gradients_give_the_bases_of_the_unscaled_one(scale, side):
  """Squares of 1e-30 underflow and of 1e30 overflow in fp32: the max-abs scaling keeps them in range."""
  sides = SIDES[side]
  g = low_rank_plus_noise(jax.random.key(2), (10, 16))
  ours = gram_basis(g * scale, RANK, sides)
  chex.assert_tree_all_finite(ours)
  for q, q_ref in zip(ours, gram_basis(g, RANK, sides)):
    if q is not None:
      assert_orthonormal(q)
      chex.assert_trees_all_close(q, q_ref, atol=1e-5)


@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (2, 7, 7)])
def test_zero_and_rank_deficient_gradients_give_orthonormal_columns(shape, side):
  sides = SIDES[side]
  zero = gram_basis(jnp.zeros(shape), 4, sides)
  chex.assert_tree_all_finite(zero)
  for q in zero:
    if q is not None:
      assert_orthonormal(q)
  # rank 2 < r = 4: the two directions with energy are found, the other two columns are orthonormal filler
  g = low_rank_plus_noise(jax.random.key(3), shape, rank=2, noise=0.0)
  ours, exact = gram_basis(g, 4, sides), svd_basis(g, 2, sides)
  chex.assert_tree_all_finite(ours)
  for q, q_exact in zip(ours, exact):
    if q is not None:
      assert_orthonormal(q, atol=1e-5)
      assert projector_gap(q[..., :2], q_exact) <= 1e-4
  np.testing.assert_allclose(captured_energy(g, ours), 1.0, atol=1e-5)


@pytest.mark.parametrize("deflations", [0, 1])
def test_ill_conditioned_what_is_and_is_not_recovered(deflations):
  """Singular values 1, 0.5, 0.25, then 1e-5 and below (under sqrt(eps)·σ₁ ≈ 3e-4).

  Recovered by one eigensolve: the top-3 subspace above the gap, exactly as by the SVD. Not recovered by it:
  directions among the tiny singular values (rank 4 keeps one of them): the SVD still finds the 4th singular
  vector, the Gram matrix cannot tell it from the others (σ² ≈ 1e-10 is below fp32 rounding of σ₁² = 1), so the
  4th column is some orthonormal direction of the tail, carrying no energy that matters (the captured energies
  agree to fp32 rounding). One deflated pass, solving again on the gradient without the top 3, finds it.
  """
  m, n = 24, 40
  k1, k2 = jax.random.split(jax.random.key(4))
  u = jnp.linalg.qr(jax.random.normal(k1, (m, m)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (n, m)))[0]
  s = jnp.concatenate([jnp.array([1.0, 0.5, 0.25]), 1e-5 * 0.5 ** jnp.arange(m - 3)])
  g = (u * s) @ v.T
  for sides in SIDES.values():
    top, top_exact = gram_basis(g, 3, sides, deflations=deflations), svd_basis(g, 3, sides)
    four, four_exact = gram_basis(g, 4, sides, deflations=deflations), svd_basis(g, 4, sides)
    for q, q_exact, q4, q4_exact in zip(top, top_exact, four, four_exact):
      if q is not None:
        assert projector_gap(q, q_exact) <= 1e-5  # recovered
        assert_orthonormal(q4)
        assert projector_gap(q4[..., :3], q_exact) <= 1e-5  # the top 3 inside the rank-4 basis too
    if sides.input:
      assert float(jnp.abs(four_exact.input[:, 3] @ u[:, 3])) > 0.99  # the SVD resolves σ₄ = 1e-5 ...
      gram_cos = float(jnp.abs(four.input[:, 3] @ u[:, 3]))
      assert gram_cos > 0.99 if deflations else gram_cos < 0.9  # ... one Gram eigensolve does not, a deflated does
    np.testing.assert_allclose(captured_energy(g, four), captured_energy(g, four_exact), atol=1e-6)


@pytest.mark.parametrize("deflations,min_overlap,max_overlap", [(0, 0, 0.95), (1, 0.999, 1), (2, 0.99999, 1)])
def test_each_deflated_pass_resolves_further_down_a_steep_spectrum(deflations, min_overlap, max_overlap):
  """σ from 1 down to 1e-6 geometrically over 48 directions, rank 40 (σ_r ≈ 1.1e-5): the overlap with the exact
  (float64) top-40 subspace grows with each pass, to the fp32 SVD's."""
  m, n, rank = 48, 80, 40
  rng = np.random.default_rng(0)
  u = np.linalg.qr(rng.normal(size=(m, m)))[0]
  v = np.linalg.qr(rng.normal(size=(n, m)))[0]
  g = jnp.asarray((u * np.geomspace(1, 1e-6, m)) @ v.T, jnp.float32)
  overlap = lambda q: np.linalg.norm(u[:, :rank].T @ np.asarray(q, np.float64)) ** 2 / rank
  assert overlap(svd_basis(g, rank, Sides(True, False)).input) > 0.99999
  q = gram_basis(g, rank, Sides(True, True), deflations=deflations)
  assert min_overlap <= overlap(q.input) <= max_overlap
  assert_orthonormal(q.input, atol=5e-6)
  assert_orthonormal(q.output, atol=5e-6)


# the products a deflated pass adds to one eigensolve's (dot_precisions' shapes): the rows B (Uᵀ A, then Wᵀ B),
# B Bᵀ and the basis U W
DEFLATED_PASS = [(10, 16), (10, 10), (10, 10)]


@pytest.mark.parametrize("deflations", [0, 1, 2])
def test_gram_and_long_side_products_run_in_full_fp32(deflations):
  """TF32 (GPU) or one bf16 pass (TPU) would blur every σ² below ~1e-3·σ₁² of the Gram matrix."""
  g = jnp.ones((10, 16))
  for sides, long_side in ((Sides(True, False), []), (Sides(True, True), [(16, 3)])):
    jaxpr = jax.make_jaxpr(lambda g, sides=sides: gram_basis(g, 3, sides, deflations=deflations))(g).jaxpr
    expected = [(10, 10)] + DEFLATED_PASS * deflations + long_side
    assert dot_precisions(jaxpr) == [(shape, True) for shape in expected]
  eighs = operand_shapes(jax.make_jaxpr(lambda g: gram_basis(g, 3, Sides(False, True), deflations=deflations))(
      g.T).jaxpr, "eigh")
  assert eighs == [(10, 10)] * (1 + deflations)  # the short side's Gram matrix, whichever side is wanted


def test_gram_sketch_keeps_the_gradient_only_for_a_long_side():
  g = jnp.ones((6, 9))
  assert gram_sketch(g, Sides(True, False)).scaled is None
  assert gram_sketch(g, Sides(False, True)).scaled.shape == (6, 9)
  assert gram_sketch(g.T, Sides(False, True)).scaled is None  # tall: the output side is the short one
  assert gram_sketch(g.T, Sides(True, True)).scaled.shape == (6, 9)
  square = jnp.ones((7, 7))  # only the output side: its own Gram matrix, no long side to carry
  assert gram_sketch(square, Sides(False, True)).scaled is None
  assert gram_sketch(square, Sides(True, True)).scaled.shape == (7, 7)


def test_methods_and_names():
  assert ExactRefresh().method_used == "gram" and ExactRefresh().two_stage
  assert ExactRefresh("jacobi").method_used == "svd" and not ExactRefresh("jacobi").two_stage
  assert not refresh_lib.is_two_stage(ExactRefresh(method="svd")) and refresh_lib.is_two_stage(ExactRefresh())
  assert refresh_lib.resolve("gram") == ExactRefresh(method="gram") and ExactRefresh().method_used == "gram"
  assert refresh_lib.resolve("svd") == refresh_lib.resolve("svd_direct") == ExactRefresh(method="svd")
  with pytest.raises(ValueError, match="method='qr'"):
    ExactRefresh(method="qr")
  with pytest.raises(ValueError, match="needs method='svd'"):
    ExactRefresh("jacobi", method="gram")
  with pytest.raises(ValueError, match="eigh_algorithm"):
    ExactRefresh(eigh_algorithm="magic")
  assert refresh_lib.resolve("gram").deflations == GRAM_DEFLATIONS == 1
  for bad in (-1, 1.5):
    with pytest.raises(ValueError, match=f"deflations must be an int >= 0, got {bad}"):
      ExactRefresh(deflations=bad)


def _four_equal_kernels_and_more():
  return {"self_attn": {name: jnp.zeros((12, 20)) for name in ("q", "k", "v", "o")}, **mixed_params()}


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_batched_looped_and_two_stage_executors_give_the_same_bases(proj_type):
  """refresh="gram" through the default looped executor (two-stage: sketches in a loop, one batched eigh per
  chunk), through batch_refresh (one stacked call), per matrix in a chunk of one, and as a plain callable."""
  params = _four_equal_kernels_and_more()
  plain = lambda grad, previous, rank: gram_basis(grad, rank, Sides(previous.input is not None,
                                                                    previous.output is not None))
  variants = [galore(rank=3, update_proj_gap=2, refresh="gram", proj_type=proj_type),
              galore(rank=3, update_proj_gap=2, refresh="gram", proj_type=proj_type, batch_refresh=True),
              galore(rank=3, update_proj_gap=2, refresh=ExactRefresh(batch_budget_bytes=0), proj_type=proj_type),
              galore(rank=3, update_proj_gap=2, refresh=plain, proj_type=proj_type)]
  grads = jax.tree.map(lambda x: low_rank_plus_noise(jax.random.key(x.size), x.shape) if x.ndim >= 2 else
                       jnp.ones_like(x), params)
  states = [jax.jit(tx.update)(grads, tx.init(params))[1] for tx in variants]
  for state in states[1:]:
    chex.assert_trees_all_close(state.bases, states[0].bases, atol=1e-5)
  exact = galore(rank=3, update_proj_gap=2, refresh="svd_direct", proj_type=proj_type)
  direct = jax.jit(exact.update)(grads, exact.init(params))[1]
  for path, basis in states[0].bases.items():
    for q, q_exact in zip(basis, direct.bases[path]):
      if q is not None:
        assert projector_gap(q, q_exact) <= 1e-4, path
  if proj_type == "std":  # the five (12, 20) kernels: one batched eigh of their 12×12 Gram matrices
    jaxpr = jax.make_jaxpr(variants[0].update)(params, variants[0].init(params)).jaxpr
    assert (5, 12, 12) in operand_shapes(jaxpr, "eigh")
