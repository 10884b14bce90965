"""Carrying the inner optimizer's moments across a refresh (``on_refresh``).

The inner transformation's state is found, not declared: a *moment* is a state leaf whose key path
ends with a projected parameter's key path and whose shape is that parameter's low-rank shape (an
8-bit :class:`~galore_jax.QuantizedMoment` counts as one leaf). It is a second moment when a field on
its path is named like one (``nu``, ``v``, ``exp_avg_sq``, ``second_moment``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from galore_jax.optim.adam8bit import (
  SIGNED_MAP,
  UNSIGNED_MAP,
  QuantizedMoment,
  dequantize_blockwise,
  quantize_blockwise,
)
from galore_jax.optim.basis import Basis, change_of_basis, rotate
from galore_jax.optim.plan import LeafPlan, path_str

SECOND_MOMENT_NAMES = frozenset({"nu", "v", "exp_avg_sq", "second_moment"})


class MomentSlot(NamedTuple):
  """A moment of a projected leaf: the leaf's index in the plan and whether it is a second moment."""

  leaf: int
  squared: bool


def flatten_inner(inner_state) -> tuple[list, Any]:
  """The inner state's leaves with each 8-bit moment as one leaf, and the treedef to rebuild it."""
  return jax.tree.flatten(inner_state, is_leaf=lambda x: isinstance(x, QuantizedMoment))


def _holds(leaf, plan: LeafPlan) -> bool:
  """Whether ``leaf`` is shaped like ``plan``'s low-rank coordinates (an 8-bit moment: as many blocks)."""
  if isinstance(leaf, QuantizedMoment):
    blocks, block_size = jnp.shape(leaf.codes)
    return blocks == max(1, -(-math.prod(plan.low_rank_shape) // block_size))
  return tuple(jnp.shape(leaf)) == plan.low_rank_shape


def moment_slots(inner_state, keypaths: Sequence[tuple], plans: Sequence[LeafPlan | None]) -> dict[int, MomentSlot]:
  """``{index in flatten_inner(inner_state): MomentSlot}`` for every moment of a projected leaf."""
  slots = {}
  is_leaf = lambda x: isinstance(x, QuantizedMoment)
  for i, (state_path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(inner_state, is_leaf=is_leaf)[0]):
    for j, plan in enumerate(plans):
      suffix = keypaths[j]
      if (plan is None or len(state_path) < len(suffix)
          or tuple(state_path[len(state_path) - len(suffix):]) != tuple(suffix)):
        continue
      if not _holds(leaf, plan):
        continue
      prefix = path_str(state_path[:len(state_path) - len(suffix)]).split("/")
      slots[i] = MomentSlot(j, any(name in SECOND_MOMENT_NAMES for name in prefix))
      break
  return slots


def _carry(moment: jax.Array, new: Basis, old: Basis, squared: bool, on_refresh: str) -> jax.Array:
  if on_refresh == "reset":
    return jnp.zeros_like(moment)
  if on_refresh == "project_first" and squared:
    return moment  # GoLore's reference rotates exp_avg only; exp_avg_sq stays in the old coordinates
  return rotate(moment, change_of_basis(new, old), squared=squared)


def _carry_where(moment, plan: LeafPlan, new: Basis, old: Basis, squared: bool, changed, on_refresh: str):
  """``moment`` carried where ``changed`` (per matrix), kept elsewhere; an 8-bit moment in fp32, then requantized."""
  mask = changed[..., None, None]
  if not isinstance(moment, QuantizedMoment):
    return jnp.where(mask, _carry(moment, new, old, squared, on_refresh), moment)
  code = UNSIGNED_MAP if squared else SIGNED_MAP
  values = dequantize_blockwise(moment, code, plan.low_rank_shape)
  carried = jnp.where(mask, _carry(values, new, old, squared, on_refresh), values)
  return quantize_blockwise(carried, code, block_size=moment.codes.shape[-1])


def carry_moments(moments: dict[int, Any], slots: dict[int, MomentSlot], plans, old_bases, new_bases, changed,
                  on_refresh: str, gates=None) -> dict[int, Any]:
  """``moments`` ({inner-state leaf index: moment}) carried into the new bases of the leaves that ``changed``.

  ``changed[j]`` says per matrix whether leaf ``j``'s basis was replaced. With ``gates`` (leaf index →
  traced bool, or a Python bool) a moment whose leaf is not due is left alone without computing its
  rotation (``lax.cond``).
  """
  out = dict(moments)
  for i, moment in moments.items():
    j, squared = slots[i]

    def carry(m, j=j, squared=squared):
      return _carry_where(m, plans[j], new_bases[j], old_bases[j], squared, changed[j], on_refresh)

    gate = None if gates is None or isinstance(gates[j], bool) else gates[j]
    out[i] = carry(moment) if gate is None else jax.lax.cond(gate, carry, lambda m: m, moment)
  return out
