"""Step-for-step parity with fira 1.0.2's FiraAdamW on the same gradient sequence, and the norm-growth limiter.

Until the second refresh both sides hold the same SVD basis up to column signs that do not matter yet;
from the second refresh on the signs may differ (torch vs jax LAPACK calls, on W vs Wᵀ) and, with the
moments kept, legitimately change the trajectory. So past it the reference is given *our* bases (after
checking that they span its own SVD subspace), and parity must hold over every refresh; and on the
reference's own trajectory we check what holds whatever the signs: outside the subspace the update is
the gradient scaled per channel by a positive factor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import fira, fira_adamw, limit_norm_growth

torch = pytest.importorskip("torch")
fira_torch = pytest.importorskip("fira")
from fira import gradient_projection  # noqa: E402

from torch_reference import (  # noqa: E402
    SHAPES,
    optax_deltas,
    reference_basis,
    relative_error,
    setup_problem,
    torch_deltas,
)

RANK, GAP, LR, ALPHA = 3, 4, 1e-2, 0.25
STEPS = 3 * GAP  # refreshes at 0, GAP, 2·GAP
PROJ_TYPES = ["std", "reverse_std", "left", "right"]  # "full": the reference's channel factor cannot broadcast
Projector = gradient_projection.GradientProjector


def torch_updates(problem, proj_type, weight_decay=0.0):
  make = lambda groups: fira_torch.FiraAdamW(groups, lr=LR, weight_decay=weight_decay)
  group = {"rank": RANK, "update_proj_gap": GAP, "alpha": ALPHA, "proj_type": proj_type}
  return torch_deltas(make, problem, group, snapshot=lambda opt, w: opt.state[w]["projector"].ortho_matrix)


def jax_updates(problem, proj_type, **kwargs):
  tx = fira_adamw(LR, rank=RANK, update_proj_gap=GAP, scale=ALPHA, proj_type=proj_type, **kwargs)
  return optax_deltas(tx, problem, snapshot=lambda state: state[0].bases["attn/kernel"])


def projector_matrix(p) -> np.ndarray:
  """The orthogonal projector onto a reference projector's subspace: ``Pᵀ P`` for right ``(r, in)``, ``P Pᵀ`` for
  left."""
  p = p.numpy()
  return p.T @ p if p.shape[0] == RANK else p @ p.T


def torch_updates_given(bases, problem, proj_type, monkeypatch):
  """The reference's updates with its SVD replaced by our bases at each refresh, and how far (projector
  entries, max) each of ours is from the subspace its own SVD would have found."""
  feed = iter([reference_basis(bases[t]) for t in range(0, len(bases), GAP)])
  own_svd = Projector.get_orthogonal_matrix
  distances = []

  def our_basis(self, weights, rank, type):
    mine = next(feed)
    distances.append(np.abs(projector_matrix(mine) - projector_matrix(own_svd(self, weights, rank, type))).max())
    return mine

  with monkeypatch.context() as patch:
    patch.setattr(Projector, "get_orthogonal_matrix", our_basis)
    ref, _ = torch_updates(problem, proj_type)
  return ref, distances


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_updates_match_reference(proj_type, shape_name, monkeypatch):
  """Against the reference as it is until the second refresh; over three refreshes (moments and limiter
  carried across them) against the reference given our bases, each of which spans its own SVD subspace."""
  problem = setup_problem(SHAPES[shape_name], steps=STEPS)
  ours, bases = jax_updates(problem, proj_type)
  ref, _ = torch_updates(problem, proj_type)
  for step in range(GAP):
    assert relative_error(ours[step][0], ref[step][0]) <= 1e-3, f"weight update, step {step}"
  for step in range(STEPS):  # non-projected parameters: plain AdamW all along
    assert relative_error(ours[step][1], ref[step][1]) <= 1e-3, f"bias update, step {step}"
  given, distances = torch_updates_given(bases, problem, proj_type, monkeypatch)
  assert len(distances) == 3 and max(distances) < 1e-4, distances  # the same subspaces, signs aside
  for step in range(STEPS):
    assert relative_error(ours[step][0], given[step][0]) <= 1e-3, f"weight update given our bases, step {step}"


def assert_scaled_per_channel_outside(update, grad, p, name):
  """``(I - Π) U = (I - Π) G · diag(k)`` with ``k > 0`` along the channels of the unprojected dimension."""
  p = p.numpy()
  if p.shape[0] == RANK:  # right: the subspace is on the in-dimension, the channels are rows (out)
    outside = lambda x: x - (x @ p.T) @ p
    u, g = outside(update), outside(grad)
  else:  # left: the subspace is on the out-dimension, the channels are columns (in): work on the transposes
    outside = lambda x: x - p @ (p.T @ x)
    u, g = outside(update).T, outside(grad).T
  k = np.sum(u * g, axis=1) / np.sum(g * g, axis=1)
  assert np.all(k < 0), (name, k)  # the update descends: -step_size · positive factor
  assert np.linalg.norm(u - k[:, None] * g) <= 1e-4 * np.linalg.norm(u), name


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_residual_outside_the_subspace_is_the_gradient_scaled_per_channel(proj_type):
  """Holds on every step of both trajectories, whatever the basis signs (so past the second refresh too)."""
  problem = setup_problem(SHAPES["tall"], steps=STEPS)
  ref, ref_bases = torch_updates(problem, proj_type)
  ours, bases = jax_updates(problem, proj_type)
  for step in range(STEPS):
    grad = problem.grads[step]
    assert_scaled_per_channel_outside(ref[step][0], grad, ref_bases[step], f"reference, step {step}")
    assert_scaled_per_channel_outside(ours[step][0], grad, reference_basis(bases[step]), f"ours, step {step}")


def test_weight_decay_matches_reference():
  problem = setup_problem(SHAPES["tall"], steps=GAP)
  problem = problem._replace(weight=problem.weight * 10)  # make the decay term visible next to the update
  ref, _ = torch_updates(problem, "std", weight_decay=0.1)
  ours, _ = jax_updates(problem, "std", weight_decay=0.1)
  no_decay, _ = jax_updates(problem, "std")
  for step in range(GAP):
    assert relative_error(ours[step][0], ref[step][0]) <= 1e-3
    assert relative_error(ours[step][1], ref[step][1]) <= 1e-3
  assert relative_error(no_decay[0][0], ref[0][0]) > 1e-2  # the decay is really exercised


def test_the_limiter_is_exercised_by_the_parity_problem():
  """Without the limiter the trajectory leaves the reference's: the parity tests above would see a missing one."""
  problem = setup_problem(SHAPES["tall"], steps=GAP)
  ref, _ = torch_updates(problem, "std")
  unlimited, _ = jax_updates(problem, "std", norm_growth_limit=None)
  assert max(relative_error(u[0], r[0]) for u, r in zip(unlimited, ref)) > 1e-2


def test_full_projection_is_refused_at_init_as_the_reference_fails():
  problem = setup_problem(SHAPES["tall"], steps=1)
  with pytest.raises(RuntimeError, match="must match the size"):
    torch_updates(problem, "full")
  with pytest.raises(ValueError, match="fira: leaf 'attn/kernel'.*per-channel"):
    fira_adamw(LR, rank=RANK, proj_type="full").init({"attn": {"kernel": jnp.zeros((8, 12))}})


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "rank"), ({"norm_growth_limit": 1.0}, "norm_growth_limit"),
                                          ({"norm_growth_limit": 0.5}, "norm_growth_limit"),
                                          ({"proj_type": "diagonal"}, "proj_type")])
def test_bad_arguments_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fira_adamw(LR, **kwargs)


def test_stacked_layers_take_the_steps_each_layer_takes_alone():
  """One limiter per matrix: a stacked ``[L, m, n]`` leaf is ``L`` separate Fira leaves."""
  layers, shape = 3, (6, 10)
  tx = optax.chain(fira(rank=2, update_proj_gap=2), optax.scale(-1e-2))
  stacked = {"attn": {"kernel": jnp.zeros((layers, *shape))}}
  s_stacked = tx.init(stacked)
  s_alone = [tx.init({"attn": {"kernel": jnp.zeros(shape)}}) for _ in range(layers)]
  step = jax.jit(tx.update)
  for t in range(5):
    g = jax.random.normal(jax.random.key(t), (layers, *shape)) * (1 + jnp.arange(layers))[:, None, None] ** t
    u_stacked, s_stacked = step({"attn": {"kernel": g}}, s_stacked)
    for i in range(layers):
      u_i, s_alone[i] = step({"attn": {"kernel": g[i]}}, s_alone[i])
      np.testing.assert_allclose(u_stacked["attn"]["kernel"][i], u_i["attn"]["kernel"], rtol=1e-5, atol=1e-8)
  assert s_stacked[0].rule_state["attn/kernel"].shape == (layers,)


# ----------------------------------------------------------------------------- the limiter, closed form


def test_limiter_first_step_passes_and_remembers_the_norm():
  s = jnp.array([[3.0, 4.0]])
  out, norm = limit_norm_growth(s, jnp.float32(0), jnp.bool_(True), 1.01)
  np.testing.assert_array_equal(out, s)
  np.testing.assert_allclose(norm, 5.0)


@pytest.mark.parametrize("previous,expected_norm", [(5.0, 5.0), (4.0, 4.04), (2.0, 2.02)])
def test_limiter_caps_growth_at_gamma(previous, expected_norm):
  """‖S‖ = 5: unchanged when it grew by ≤ γ, else rescaled onto γ·previous (up to the 1e-8 in the denominator)."""
  s = jnp.array([[3.0, 4.0]])
  out, norm = limit_norm_growth(s, jnp.float32(previous), jnp.bool_(False), 1.01)
  np.testing.assert_allclose(jnp.linalg.norm(out), expected_norm, rtol=1e-6)
  np.testing.assert_allclose(norm, expected_norm, rtol=1e-6)
  np.testing.assert_allclose(out / jnp.linalg.norm(out), s / 5.0, rtol=1e-6)  # direction kept


def test_limiter_lets_norms_shrink_and_works_per_matrix():
  s = jnp.stack([jnp.full((2, 2), 1.0), jnp.full((2, 2), 10.0)])  # norms 2 and 20
  out, norm = limit_norm_growth(s, jnp.array([100.0, 10.0]), jnp.bool_(False), 1.5)
  np.testing.assert_allclose(norm, [2.0, 15.0], rtol=1e-6)
  np.testing.assert_allclose(out[0], s[0])
  np.testing.assert_allclose(out[1], s[1] * 0.75, rtol=1e-6)
