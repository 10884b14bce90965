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
