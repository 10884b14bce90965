"""Step-for-step parity with apollo-torch 1.0.3's APOLLOAdamW (APOLLO and APOLLO-Mini), and the random projection.

The reference draws its projection with torch's generator seeded by the parameter's index; we draw ours
from jax keys. The two are never compared: the reference's projector is given *our* matrix at each
re-draw, so both sides see the same projection, and parity must hold over several re-draws (moments kept
across them, as the reference does). With ``proj="svd"`` the reference runs as it is until the second
refresh, then with our (checked) bases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import Basis, RandomProjection, apollo, apollo_adamw, apollo_mini

torch = pytest.importorskip("torch")
apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch import random_projector, svd_projector  # noqa: E402

from torch_reference import (  # noqa: E402
    SHAPES,
    optax_deltas,
    reference_basis,
    relative_error,
    setup_problem,
    torch_deltas,
)

GAP, LR = 4, 1e-2
STEPS = 3 * GAP  # re-draws at 0, GAP, 2·GAP
PROJ_TYPES = ["std", "reverse_std", "left", "right"]  # the reference's random projector has no "full"
# (scale_type, rank, scale): APOLLO as its scripts (channel, scale 1) and APOLLO-Mini (tensor, rank 1, scale 128)
MODES = {"apollo": ("channel", 3, 1.0), "apollo_mini": ("tensor", 1, 128.0)}
# Channel factors that cannot scale the kernel: the reference fails to broadcast them, we refuse them at init.
REFUSED = {("reverse_std", "tall"), ("reverse_std", "wide"), ("reverse_std", "square"), ("left", "tall"),
           ("left", "square"), ("right", "wide")}


def ours_for(mode, proj_type, **kwargs):
  scale_type, rank, scale = MODES[mode]
  if mode == "apollo_mini":
    return apollo_mini(LR, update_proj_gap=GAP, proj_type=proj_type, **kwargs)
  return apollo_adamw(LR, rank=rank, update_proj_gap=GAP, scale=scale, proj_type=proj_type, scale_type=scale_type,
                      **kwargs)


def jax_updates(problem, tx):
  return optax_deltas(tx, problem, snapshot=lambda state: state[0].bases["attn/kernel"])


def torch_updates(problem, mode, proj_type, proj="random", scale_front=False, disable_nl=False, weight_decay=0.0):
  scale_type, rank, scale = MODES[mode]
  make = lambda groups: apollo_torch.APOLLOAdamW(groups, lr=LR, scale_front=scale_front, disable_nl=disable_nl,
                                                 weight_decay=weight_decay)
  group = {"rank": rank, "update_proj_gap": GAP, "proj": proj, "scale_type": scale_type, "scale": scale,
           "proj_type": proj_type}
  return torch_deltas(make, problem, group, snapshot=lambda opt, w: opt.state[w]["projector"].ortho_matrix)


def fed_our_projections(monkeypatch, bases, projector=random_projector.GradientProjector):
  """Make the reference's projector return our basis of each refresh step instead of drawing (or computing) one.

  Returns the list into which each call appends the reference's own matrix (for an SVD projector, to check ours).
  """
  feed = iter([reference_basis(bases[t]) for t in range(0, len(bases), GAP)])
  own = projector.get_orthogonal_matrix
  seen = []

  def ours(self, weights, rank, type, **kwargs):
    seen.append(own(self, weights, rank, type, **kwargs))
    return next(feed)

  monkeypatch.setattr(projector, "get_orthogonal_matrix", ours)
  return seen


def assert_parity(ours, ref, steps=STEPS):
  for step in range(steps):
    assert relative_error(ours[step][0], ref[step][0]) <= 1e-3, f"weight update, step {step}"
    assert relative_error(ours[step][1], ref[step][1]) <= 1e-3, f"bias update, step {step}"


@pytest.mark.parametrize("mode,proj_type,shape_name", [  # APOLLO's refused combinations: see the refusal test
    (mode, proj_type, shape) for mode in MODES for proj_type in PROJ_TYPES for shape in SHAPES
    if mode == "apollo_mini" or (proj_type, shape) not in REFUSED])
def test_updates_match_reference_given_the_same_projection(mode, proj_type, shape_name, monkeypatch):
  problem = setup_problem(SHAPES[shape_name], steps=STEPS)
  ours, bases = jax_updates(problem, ours_for(mode, proj_type))
  drawn = fed_our_projections(monkeypatch, bases)
  ref, ref_bases = torch_updates(problem, mode, proj_type)
  assert len(drawn) == 3  # the reference re-drew at steps 0, GAP, 2·GAP: each time it got ours
  assert [tuple(b.shape) for b in drawn] == [tuple(reference_basis(bases[0]).shape)] * 3
  assert not np.allclose(np.asarray(bases[0].input if bases[0].input is not None else bases[0].output),
                         np.asarray(bases[GAP].input if bases[GAP].input is not None else bases[GAP].output))
  assert_parity(ours, ref)


@pytest.mark.parametrize("scale_front,limit", [(True, 1.01), (False, None), (True, None)])
def test_scale_front_and_disabled_limiter_match_reference(scale_front, limit, monkeypatch):
  problem = setup_problem(SHAPES["tall"], steps=STEPS)
  ours, bases = jax_updates(problem, ours_for("apollo_mini", "std", scale_front=scale_front, norm_growth_limit=limit))
  fed_our_projections(monkeypatch, bases)
  ref, _ = torch_updates(problem, "apollo_mini", "std", scale_front=scale_front, disable_nl=limit is None)
  assert_parity(ours, ref)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_limiter_is_exercised_by_the_parity_problem(mode, monkeypatch):
  """Without the limiter the trajectory leaves the reference's: the parity tests would see a missing one."""
  problem = setup_problem(SHAPES["tall"], steps=STEPS)
  _, bases = jax_updates(problem, ours_for(mode, "std"))
  unlimited, _ = jax_updates(problem, ours_for(mode, "std", norm_growth_limit=None))
  fed_our_projections(monkeypatch, bases)
  ref, _ = torch_updates(problem, mode, "std")
  assert max(relative_error(u[0], r[0]) for u, r in zip(unlimited, ref)) > 1e-2


@pytest.mark.parametrize("mode,shape_name", [("apollo", "tall"), ("apollo", "wide"), ("apollo", "square"),
                                             ("apollo_mini", "wide")])
def test_svd_projection_matches_reference(mode, shape_name, monkeypatch):
  """``proj="svd"``: the reference's own SVD until the second refresh, then our bases (checked to span its subspace)."""
  problem = setup_problem(SHAPES[shape_name], steps=STEPS)
  ours, bases = jax_updates(problem, ours_for(mode, "std", refresh="svd"))
  ref, _ = torch_updates(problem, mode, "std", proj="svd")
  assert_parity(ours, ref, steps=GAP)
  own = fed_our_projections(monkeypatch, bases, svd_projector.GaLoreProjector)
  given, _ = torch_updates(problem, mode, "std", proj="svd")
  for mine, theirs in zip([reference_basis(bases[t]) for t in range(0, STEPS, GAP)], own):
    square = lambda p: (p.T @ p if p.shape[0] <= p.shape[1] else p @ p.T).numpy()
    assert np.abs(square(mine) - square(theirs)).max() < 1e-4
  assert_parity(ours, given)


def test_weight_decay_matches_reference(monkeypatch):
  problem = setup_problem(SHAPES["wide"], steps=GAP)
  problem = problem._replace(weight=problem.weight * 10)  # make the decay term visible next to the update
  ours, bases = jax_updates(problem, ours_for("apollo", "std", weight_decay=0.1))
  no_decay, _ = jax_updates(problem, ours_for("apollo", "std"))
  fed_our_projections(monkeypatch, bases)
  ref, _ = torch_updates(problem, "apollo", "std", weight_decay=0.1)
  assert_parity(ours, ref, steps=GAP)
  assert relative_error(no_decay[0][0], ref[0][0]) > 1e-2  # the decay is really exercised


@pytest.mark.parametrize("proj_type,shape_name", sorted(REFUSED))
def test_channel_factors_that_cannot_broadcast_are_refused_as_the_reference_fails(proj_type, shape_name):
  problem = setup_problem(SHAPES[shape_name], steps=1)
  with pytest.raises(RuntimeError, match="must match the size"):
    torch_updates(problem, "apollo", proj_type)  # its own random projection: no patch needed to fail
  out_dim, in_dim = SHAPES[shape_name]
  with pytest.raises(ValueError, match="apollo: leaf 'attn/kernel'.*per-channel"):
    ours_for("apollo", proj_type).init({"attn": {"kernel": jnp.zeros((in_dim, out_dim))}})
  ours_for("apollo_mini", proj_type).init({"attn": {"kernel": jnp.zeros((in_dim, out_dim))}})  # tensor-wise: fine


@pytest.mark.parametrize("make,kwargs,match", [
    (apollo_adamw, {"scale_type": "row"}, "scale_type"),
    (apollo_adamw, {"rank": 0}, "rank"),
    (apollo_adamw, {"norm_growth_limit": 1.0}, "norm_growth_limit"),
    (apollo_adamw, {"on_refresh": "project"}, "on_refresh='project' needs orthonormal bases"),
    (apollo_adamw, {"adaptive_gap": __import__("galore_jax").AdaptiveGap()}, "adaptive_gap"),
    (apollo_mini, {"rank": 4}, "APOLLO-Mini is rank 1"),
])
def test_bad_arguments_fail_at_construction(make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(LR, **kwargs)


def test_defaults_are_the_references_recommended_settings():
  params = {"attn": {"kernel": jnp.zeros((8, 12))}}
  mini = apollo_mini(LR).init(params)[0]
  assert mini.inner_state.mu["attn"]["kernel"].shape == (1, 12)  # rank 1 on the smaller (input) side
  full = apollo_adamw(LR, rank=4, refresh="svd", on_refresh="project").init(params)[0]  # orthonormal: allowed
  assert full.bases["attn/kernel"].input.shape == (8, 4)


# ----------------------------------------------------------------------------- the random projection


def test_random_projection_is_gaussian_over_sqrt_rank_and_keyed():
  rank = 16
  previous = Basis(input=jnp.zeros((4000, rank)), output=None)
  p = RandomProjection()(None, previous, rank, key=jax.random.key(3)).input
  np.testing.assert_allclose(float(jnp.mean(p)), 0.0, atol=3e-3)
  np.testing.assert_allclose(float(jnp.var(p)), 1.0 / rank, rtol=2e-2)
  again = RandomProjection()(None, previous, rank, key=jax.random.key(3)).input
  np.testing.assert_array_equal(p, again)
  other = RandomProjection()(None, previous, rank, key=jax.random.key(4)).input
  assert float(jnp.abs(p - other).max()) > 0.1
  both = RandomProjection()(None, Basis(jnp.zeros((6, 2)), jnp.zeros((6, 2))), 2, key=jax.random.key(3))
  assert float(jnp.abs(both.input - both.output).max()) > 0.1  # two sides, two draws


def test_draws_depend_on_the_step_and_the_matrix_only():
  """Re-drawn every gap, different per matrix, and a stacked ``[L, m, n]`` leaf draws what L leaves would."""
  layers, shape = 2, (6, 10)
  tx = optax.chain(apollo(rank=2, update_proj_gap=2), optax.scale(-1e-2))
  stacked = {"attn": {"kernel": jnp.zeros((layers, *shape))}}
  alone = {"attn": {f"k{i}": jnp.zeros(shape) for i in range(layers)}}
  s_stacked, s_alone = tx.init(stacked), tx.init(alone)
  step = jax.jit(tx.update)
  drawn = []
  for t in range(4):
    g = jax.random.normal(jax.random.key(t), (layers, *shape)) * (1 + jnp.arange(layers))[:, None, None] ** t
    u_stacked, s_stacked = step({"attn": {"kernel": g}}, s_stacked)
    u_alone, s_alone = step({"attn": {f"k{i}": g[i] for i in range(layers)}}, s_alone)
    for i in range(layers):  # the same projections, each matrix its own limiter
      np.testing.assert_allclose(u_stacked["attn"]["kernel"][i], u_alone["attn"][f"k{i}"], rtol=1e-5, atol=1e-8)
      np.testing.assert_array_equal(s_stacked[0].bases["attn/kernel"].input[i],
                                    s_alone[0].bases[f"attn/k{i}"].input)
    drawn.append(np.asarray(s_stacked[0].bases["attn/kernel"].input))
  np.testing.assert_array_equal(drawn[0], drawn[1])  # kept between re-draws
  assert np.abs(drawn[2] - drawn[1]).max() > 0.1  # re-drawn at step 2
  assert np.abs(drawn[0][0] - drawn[0][1]).max() > 0.1  # matrices draw apart
