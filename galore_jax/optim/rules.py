"""How a projected leaf's full-rank update is formed: the last step of :func:`galore_jax.galore`.

An update rule sees, per targeted leaf, the gradient ``G [..., m, n]``, the basis, the low-rank
gradient ``R = project(G)``, the inner transformation's output ``N = inner(R)`` and its own state,
and returns the full-rank update. GaLore projects ``N`` back (:class:`ProjectBack`); the follow-ups
of the family differ here (a residual term, a per-channel scaling of ``G``, a norm-growth limiter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from galore_jax.optim.basis import Basis, project_back
from galore_jax.optim.plan import LeafPlan


class UpdateRule(Protocol):
  """``init(plan) -> state`` and ``rule(plan, grad, basis, low_grad, low_update, state, count, scale) ->
  (update [..., m, n], state)``; ``stateful`` says whether it keeps a state (``GaLoreState.rule_state``).

  ``init`` runs for every targeted leaf when the transformation is initialised, stateful or not, so it is
  where a rule refuses a leaf it cannot handle (a ValueError naming ``plan.path``).

  ``count`` is the number of completed steps before this one; ``scale`` is GaLore's ``scale`` option.
  """

  stateful: bool

  def init(self, plan: LeafPlan) -> Any:
    ...

  def __call__(self, plan: LeafPlan, grad: jax.Array, basis: Basis, low_grad: jax.Array, low_update: jax.Array,
               state: Any, count: jax.Array, scale) -> tuple[jax.Array, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class ProjectBack:
  r"""GaLore's rule: :math:`U = \alpha\,Q\,N` (the inner update projected back, times ``scale``). Stateless."""

  stateful = False

  def init(self, plan: LeafPlan) -> None:
    return None

  def __call__(self, plan, grad, basis, low_grad, low_update, state, count, scale):
    full = project_back(low_update, basis)
    return (scale * full.astype(jnp.float32)).astype(grad.dtype), state


RATIO_EPS = 1e-8
"""Added to the denominators of the norm ratios and of the limiter, as in the Fira and APOLLO references."""


def norm_ratio(low_update: jax.Array, low_grad: jax.Array, axis: int | None) -> jax.Array:
  r"""``‖N‖ / (‖R‖ + 1e-8)`` along ``axis`` (kept, size 1), or over the whole matrix (``axis=None``: ``[..., 1, 1]``).

  With ``N`` the inner (Adam-normalized) update and ``R`` the low-rank gradient this is the factor by which
  Adam rescales the gradient, per channel or per matrix: Fira scales its residual and APOLLO the whole
  gradient by it. fp32.
  """
  axes = (-2, -1) if axis is None else (axis,)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
  return norm(low_update) / (norm(low_grad) + RATIO_EPS)


def check_channel_factor(method: str, plan: LeafPlan, low_shape: tuple[int, ...], axis: int) -> None:
  """Refuse a leaf whose per-channel factor (a norm of ``low_shape`` along ``axis``) cannot scale its ``[m, n]`` matrix.

  The factor keeps the other axis of the low-rank matrix; it must be the matrix's (``m`` or ``n``) or 1.
  The references broadcast the same way, and fail where this refuses.
  """
  kept, full, name = (low_shape[-2], plan.m, "input") if axis == -1 else (low_shape[-1], plan.n, "output")
  if kept not in (full, 1):
    raise ValueError(
        f"{method}: leaf {plan.path!r} (kernel {plan.m}x{plan.n}, low-rank {low_shape[-2]}x{low_shape[-1]}) has "
        f"{kept} per-channel factors for its {full} {name} channels: the reference cannot scale this projection "
        "per channel (its broadcast fails); use proj_type='std'")


def limit_norm_growth(update: jax.Array, previous_norm: jax.Array, first: jax.Array, limit: float):
  r"""Fira's norm-growth limiter, per matrix: ``(update, norm to remember)``.

  .. math::
    \ell_t = \max\!\Big(\frac{\|S_t\|}{\|S_{t-1}\|' + 10^{-8}},\ \gamma\Big) / \gamma,\qquad
    S_t \leftarrow S_t / \ell_t,\qquad \|S_t\|' = \|S_t\| / \ell_t

  so the norm of what is applied grows by at most the factor ``γ = limit`` per step. On the first step
  (``first``) nothing is limited and ``‖S_0‖`` is remembered. ``update [..., m, n]``, ``previous_norm [...]`` fp32.
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(update), axis=(-2, -1)))
  limiter = jnp.maximum(norm / (previous_norm + RATIO_EPS), limit) / limit
  limiter = jnp.where(first, jnp.float32(1), limiter)
  return update / limiter[..., None, None], norm / limiter


def check_norm_growth_limit(limit) -> None:
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 1):
    raise ValueError(f"norm_growth_limit must be > 1 (the growth factor γ allowed per step; the references use 1.01) "
                     f"or None (no limiter), got {limit!r}")
