"""Behaviour of the GaLore transformation: refresh schedule, layouts, guards, moments, dtypes, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import low_rank_grad, primitive_names

from galore_jax import (
    GaLoreDimensionNumbers,
    GaLoreState,
    NothingTargetedWarning,
    Sides,
    choose_sides,
    galore,
    galore_adamw,
    plan_leaves,
    project,
    project_back,
    svd_basis,
)


def galore_state(state) -> GaLoreState:
  return state[0] if not isinstance(state, GaLoreState) else state


# ----------------------------------------------------------------------------- projection math


@pytest.mark.parametrize(
    "proj_type,m,n,expected",
    [
        ("std", 4, 6, Sides(True, False)),  # in < out: project the input dim (torch 'right')
        ("std", 6, 4, Sides(False, True)),
        ("std", 5, 5, Sides(True, False)),  # square: the input dim, as the reference
        ("reverse_std", 4, 6, Sides(False, True)),
        ("reverse_std", 6, 4, Sides(True, False)),
        ("reverse_std", 5, 5, Sides(False, True)),
        ("left", 4, 6, Sides(False, True)),
        ("right", 6, 4, Sides(True, False)),
        ("full", 6, 4, Sides(True, True)),
    ],
)
def test_choose_sides_maps_reference_rule_to_kernel_layout(proj_type, m, n, expected):
  assert choose_sides(proj_type, m, n) == expected


def test_project_back_inverts_project_on_the_subspace():
  g = low_rank_grad(jax.random.key(0), (7, 5), rank=3)
  for sides in (Sides(True, False), Sides(False, True), Sides(True, True)):
    basis = svd_basis(g, 3, sides)
    np.testing.assert_allclose(project_back(project(g, basis), basis), g, atol=1e-5)
  basis = svd_basis(g, 3, Sides(True, False))
  assert basis.input.shape == (7, 3) and basis.output is None
  np.testing.assert_allclose(basis.input.T @ basis.input, np.eye(3), atol=1e-5)


# ----------------------------------------------------------------------------- refresh schedule


def test_bases_refresh_exactly_every_gap_steps():
  params = {"mlp": {"kernel": jnp.zeros((6, 8))}}
  tx = galore(rank=2, update_proj_gap=3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  changed = []
  for t in range(7):
    g = {"mlp": {"kernel": low_rank_grad(jax.random.key(t), (6, 8))}}
    new_state = step(g, state)[1]
    changed.append(not np.allclose(new_state.bases["mlp/kernel"].input, state.bases["mlp/kernel"].input))
    state = new_state
  assert changed == [True, False, False, True, False, False, True]
  assert int(state.count) == 7


@pytest.mark.parametrize("refresh, factorisation", [("gram", "eigh"), ("svd", "svd")])
@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_svd_only_inside_the_refresh_branch(refresh, factorisation, proj_type):
  params = {"attn": {"kernel": jnp.zeros((2, 6, 8))}, "mlp": {"kernel": jnp.zeros((8, 6))}}
  tx = galore_adamw(1e-3, rank=2, update_proj_gap=5, refresh=refresh, proj_type=proj_type)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  found = [(name, inside) for name, inside in primitive_names(jaxpr) if name in ("svd", "eigh", "qr", "geqrf")]
  assert any(name == factorisation for name, _ in found)
  assert all(inside for _, inside in found), f"every factorisation must sit inside the lax.cond refresh branch: {found}"


def test_non_refresh_steps_run_no_refresh_work():
  calls = []

  def counting_refresh(grad, previous, rank):
    jax.debug.callback(lambda: calls.append(1))
    return svd_basis(grad, rank, Sides(previous.input is not None, previous.output is not None))

  params = {"mlp": {"kernel": jnp.zeros((6, 8))}}
  tx = galore(rank=2, update_proj_gap=4, refresh=counting_refresh)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(9):
    _, state = step({"mlp": {"kernel": low_rank_grad(jax.random.key(t), (6, 8))}}, state)
  jax.effects_barrier()
  assert len(calls) == 3  # steps 0, 4, 8


# ----------------------------------------------------------------------------- layouts


def test_stacked_layers_take_the_steps_each_layer_takes_alone():
  layers, shape = 3, (6, 10)
  tx = galore_adamw(1e-2, rank=2, update_proj_gap=2)
  stacked = {"attn": {"kernel": jnp.zeros((layers, *shape))}}
  alone = [{"attn": {"kernel": jnp.zeros(shape)}} for _ in range(layers)]
  s_stacked = tx.init(stacked)
  s_alone = [tx.init(p) for p in alone]
  step = jax.jit(tx.update)
  for t in range(5):
    g = low_rank_grad(jax.random.key(t), (layers, *shape))
    u_stacked, s_stacked = step({"attn": {"kernel": g}}, s_stacked, stacked)
    for i in range(layers):
      u_i, s_alone[i] = step({"attn": {"kernel": g[i]}}, s_alone[i], alone[i])
      np.testing.assert_allclose(u_stacked["attn"]["kernel"][i], u_i["attn"]["kernel"], rtol=1e-5, atol=1e-8)
  assert galore_state(s_stacked).bases["attn/kernel"].input.shape == (layers, 6, 2)


def test_dimension_numbers_for_multi_axis_kernels():
  embed, heads, head_dim = 8, 2, 3
  g = low_rank_grad(jax.random.key(0), (embed, heads * head_dim))
  dims = GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = galore(rank=2, update_proj_gap=10, dimension_numbers=dims)
  tx2 = galore(rank=2, update_proj_gap=10)
  p3 = {"attn": {"q": jnp.zeros((embed, heads, head_dim))}}
  p2 = {"attn": {"q": jnp.zeros((embed, heads * head_dim))}}
  u3, _ = tx3.update({"attn": {"q": g.reshape(embed, heads, head_dim)}}, tx3.init(p3))
  u2, _ = tx2.update({"attn": {"q": g}}, tx2.init(p2))
  np.testing.assert_allclose(u3["attn"]["q"].reshape(embed, -1), u2["attn"]["q"], rtol=1e-5)

  # head_dim as batch axis: one basis per head.
  per_head = GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)
  _, plans, _ = plan_leaves({"attn": {"q": jnp.zeros((embed, head_dim, heads))}}, dimension_numbers=per_head)
  assert plans[0].batch_shape == (heads,) and (plans[0].m, plans[0].n) == (embed, head_dim)


def test_rank_callable_and_clipping():
  params = {"attn": {"a": jnp.zeros((4, 20)), "b": jnp.zeros((20, 30))}}
  _, plans, _ = plan_leaves(params, rank=lambda path, shape: 8 if path.endswith("a") else 5)
  assert [p.rank for p in plans] == [4, 5]  # 8 clipped to min(4, 20)
  assert [p.low_rank_shape for p in plans] == [(4, 20), (5, 30)]


def test_target_forms():
  params = {"attn": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}, "embed": jnp.zeros((9, 4)),
            "mlp": {"kernel": jnp.zeros((4, 4))}}
  targeted = lambda **kw: sorted(p.path for p in plan_leaves(params, **kw)[1] if p)
  assert targeted() == ["attn/kernel", "mlp/kernel"]  # default: attn|mlp, ndim >= 2
  assert targeted(target=r"embed") == ["embed"]
  assert targeted(target=[r"^mlp", r"embed"]) == ["embed", "mlp/kernel"]
  assert targeted(target=lambda path, leaf: leaf.shape[0] == 9) == ["embed"]
  flags = {"attn": {"kernel": True, "bias": False}, "embed": False, "mlp": {"kernel": False}}
  assert targeted(target=flags) == ["attn/kernel"]
  assert targeted(target=r"attn") == ["attn/kernel"]  # a pattern selects matrices: attn/bias is skipped
  with pytest.raises(ValueError, match="'attn/bias' of shape \\(4,\\): GaLore needs ndim >= 2"):
    targeted(target=lambda path, leaf: path.startswith("attn"))  # a callable selects exactly what it says
  with pytest.raises(ValueError, match=r"target 'attn\(\(' is not a regular expression: missing \)"):
    targeted(target=[r"mlp", r"attn(("])


def test_a_target_that_selects_nothing_is_said_once_at_init():
  params = {"dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
  with pytest.warns(NothingTargetedWarning, match=r"default target 'attn\|mlp' selects no leaf .*'dense/bias'"):
    state = galore(rank=2).init(params)
  assert state.bases == {}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    galore(rank=2, target="dense").init(params)  # selects dense/kernel: no warning
    galore(rank=2).init({"norm": jnp.zeros(4)})  # no matrix at all: nothing to say


# ----------------------------------------------------------------------------- non-finite guard


def test_refresh_on_non_finite_gradient_keeps_previous_basis():
  params = {"attn": {"kernel": jnp.zeros((2, 6, 8))}}
  tx = galore(rank=2, update_proj_gap=1)
  state = tx.init(params)
  _, state = tx.update({"attn": {"kernel": low_rank_grad(jax.random.key(0), (2, 6, 8))}}, state)
  before = state.bases["attn/kernel"].input
  bad = low_rank_grad(jax.random.key(1), (2, 6, 8)).at[1, 0, 0].set(jnp.nan)
  _, state = jax.jit(tx.update)({"attn": {"kernel": bad}}, state)
  after = state.bases["attn/kernel"].input
  assert np.all(np.isfinite(after))
  np.testing.assert_array_equal(after[1], before[1])  # the layer with the NaN keeps its basis
  assert not np.allclose(after[0], before[0])  # the healthy layer refreshed


def test_apply_if_finite_skips_a_bad_refresh_step_cleanly():
  params = {"mlp": {"kernel": jnp.zeros((6, 8))}}
  tx = optax.apply_if_finite(galore_adamw(1e-2, rank=2, update_proj_gap=2), max_consecutive_errors=5)
  grads = [low_rank_grad(jax.random.key(t), (6, 8)) for t in range(4)]
  bad = grads[0].at[0, 0].set(jnp.inf)
  step = jax.jit(tx.update)

  def run(sequence):
    state, outs = tx.init(params), []
    for g in sequence:
      u, state = step({"mlp": {"kernel": g}}, state, params)
      outs.append(u["mlp"]["kernel"])
    return outs, state

  clean, _ = run(grads)
  with_bad, state = run([bad] + grads)
  np.testing.assert_array_equal(with_bad[0], 0.0)
  for a, b in zip(with_bad[1:], clean):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_first_basis_is_orthonormal_even_without_a_refresh():
  params = {"mlp": {"kernel": jnp.zeros((6, 8))}}
  state = galore(rank=3).init(params)
  q = state.bases["mlp/kernel"].input
  np.testing.assert_array_equal(q.T @ q, np.eye(3))


# ----------------------------------------------------------------------------- moments at refresh


def _adam_state(state):
  return galore_state(state).inner_state


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "project"])
def test_moments_at_refresh(on_refresh):
  m, n, r = 6, 8, 2
  params = {"mlp": {"kernel": jnp.zeros((m, n))}}
  tx = galore(optax.scale_by_adam(b1=0.9, b2=0.99), rank=r, update_proj_gap=2, on_refresh=on_refresh)
  state = tx.init(params)
  g0 = low_rank_grad(jax.random.key(0), (m, n), rank=r)
  _, state = tx.update({"mlp": {"kernel": g0}}, state)
  _, state = tx.update({"mlp": {"kernel": 0.5 * g0}}, state)
  old_q = state.bases["mlp/kernel"].input
  old_mu = _adam_state(state).mu["mlp"]["kernel"]
  old_nu = _adam_state(state).nu["mlp"]["kernel"]
  # Same subspace, singular values swapped: the new basis is a signed permutation of the old one.
  u, s, vh = jnp.linalg.svd(g0)
  g2 = (u[:, :r] * s[:r][::-1]) @ vh[:r]
  _, state = tx.update({"mlp": {"kernel": g2}}, state)
  new_q = state.bases["mlp/kernel"].input
  mu = _adam_state(state).mu["mlp"]["kernel"]
  nu = _adam_state(state).nu["mlp"]["kernel"]
  fresh_mu, fresh_nu = 0.1 * (new_q.T @ g2), 0.01 * (new_q.T @ g2) ** 2
  if on_refresh == "keep":
    np.testing.assert_allclose(mu, 0.9 * old_mu + fresh_mu, atol=1e-6)
  elif on_refresh == "reset":
    np.testing.assert_allclose(mu, fresh_mu, atol=1e-6)
    np.testing.assert_allclose(nu, fresh_nu, atol=1e-6)
  else:  # the full-space first moment Q m is carried over unchanged; v follows its coordinates
    np.testing.assert_allclose(new_q @ (mu - fresh_mu), 0.9 * old_q @ old_mu, atol=1e-5)
    rotation = new_q.T @ old_q
    np.testing.assert_allclose(nu - fresh_nu, 0.99 * (rotation**2) @ old_nu, atol=1e-6)
    assert not np.allclose(new_q, old_q)  # the test really exercised a basis change


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_gradient_dtype(dtype):
  params = {"mlp": {"kernel": jnp.zeros((6, 8), dtype)}, "norm": jnp.ones(6, dtype)}
  tx = galore_adamw(1e-2, rank=2, basis_dtype=dtype, moment_dtype=dtype, weight_decay=0.1)
  state = tx.init(params)
  g = {"mlp": {"kernel": low_rank_grad(jax.random.key(0), (6, 8)).astype(dtype)}, "norm": jnp.ones(6, dtype)}
  updates, state = jax.jit(tx.update)(g, state, params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert state[0].bases["mlp/kernel"].input.dtype == dtype
  assert state[0].inner_state.mu["mlp"]["kernel"].dtype == dtype


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"proj_type": "diagonal"}, "proj_type"),
        ({"on_refresh": "rotate"}, "on_refresh"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    galore(**kwargs)


def test_traced_rank_is_refused_with_a_hint():
  with pytest.raises(TypeError, match="static_args"):
    galore(rank=jnp.asarray(4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target": lambda path, leaf: "bias" in path}, "attn/bias"),  # a pattern would skip the vector
        ({"dimension_numbers": GaLoreDimensionNumbers(0, 0)}, "attn/kernel"),
        ({"dimension_numbers": GaLoreDimensionNumbers(0, 5)}, "attn/kernel"),
        ({"rank": lambda path, shape: 0}, "attn/kernel"),
    ],
)
def test_bad_leaves_fail_at_init_naming_the_path(kwargs, match):
  params = {"attn": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(ValueError, match=match):
    galore(**kwargs).init(params)
