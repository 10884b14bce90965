"""When each leaf refreshes its basis: the fixed gap, staggered offsets, and the adaptive gap."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from galore_jax.optim.plan import LeafPlan


@dataclasses.dataclass(frozen=True)
class AdaptiveGap:
  """Per-leaf adaptive refresh gap, after Q-GaLore (which doubles the gap when successive top singular
  vectors keep a cosine ≥ 0.4).

  At every refresh after the first, the new basis of a leaf is compared with the one it replaces by the
  chance-normalised overlap ``(o - c) / (1 - c)``, where ``o`` is
  :func:`~galore_jax.subspace_overlap` (mean squared cosine of the principal angles, over all
  ``r`` directions and batch elements) and ``c = r / d`` its expected value for a random ``r``-dimensional
  subspace of the projected dimension ``d`` (averaged over sides for ``full``). If it is ``≥ threshold``
  the leaf's gap is multiplied by ``factor`` (up to ``max_gap``); if not, it falls back to
  ``update_proj_gap`` (the subspace moves: refresh often again). The leaf's next refresh is the current
  step plus its new gap.

  Attributes:
    threshold: on the normalised overlap, in ``(0, 1]``; default 0.4 (Q-GaLore's number, applied to a
      whole-subspace measure, which is stricter than the top vector's cosine).
    factor: gap multiplier (default 2).
    max_gap: cap on a leaf's gap; ``None`` = ``8 · update_proj_gap``.
  """

  threshold: float = 0.4
  factor: int = 2
  max_gap: int | None = None

  def __post_init__(self):
    if not 0 < self.threshold <= 1 or self.factor < 1 or (self.max_gap is not None and self.max_gap < 1):
      raise ValueError(f"bad AdaptiveGap {self}")

  def initial_entry(self, update_proj_gap: int) -> jax.Array:
    """A leaf's ``[gap, next step]`` before its first refresh."""
    return jnp.array([update_proj_gap, 0], jnp.int32)

  def advance(self, entry: jax.Array, overlap: jax.Array, plan: LeafPlan, count: jax.Array, offset: int,
              update_proj_gap: int) -> jax.Array:
    """The ``[gap, next step]`` after a refresh at step ``count`` whose new basis overlaps the old one by ``overlap``.

    The first refresh (step 0) keeps the gap and schedules the next one at the leaf's stagger
    ``offset`` (or one gap later without stagger).
    """
    chance = [plan.rank / d for d, side in ((plan.m, plan.sides.input), (plan.n, plan.sides.output)) if side]
    chance = sum(chance) / len(chance)
    normalized = (overlap - chance) / (1 - chance) if chance < 1 else jnp.float32(1)
    gap = entry[0]
    max_gap = self.max_gap or 8 * update_proj_gap
    grown = jnp.where(normalized >= self.threshold, jnp.minimum(gap * self.factor, max_gap),
                      update_proj_gap).astype(jnp.int32)
    first = count == 0
    new_gap = jnp.where(first, gap, grown)
    next_step = jnp.where(first, offset if offset > 0 else update_proj_gap, count + new_gap)
    return jnp.stack([new_gap, next_step]).astype(jnp.int32)


def refresh_work(plan: LeafPlan) -> int:
  """A leaf's refresh cost in the model :func:`refresh_offsets` balances: ``batch · m · n · min(m, n)``."""
  return plan.matrices * plan.m * plan.n * min(plan.m, plan.n)


def refresh_offsets(plans: Sequence[LeafPlan | None], update_proj_gap: int, stagger: bool) -> list[int | None]:
  """Per leaf, the phase of its refresh schedule in ``[0, update_proj_gap)`` (``None`` for untargeted leaves).

  A leaf with offset ``o`` refreshes on step 0 and on every step ``t > 0`` with
  ``(t - o) % update_proj_gap == 0``, so after the first step it refreshes exactly
  once in any ``update_proj_gap`` consecutive steps. Without stagger every offset
  is 0 (the reference's schedule). With stagger the leaves are spread over the
  offsets by cost, largest first, each onto the offset with the least refresh
  work so far (:func:`refresh_work`); ties go to the lowest offset, so a
  single leaf keeps offset 0. Stacked layers ``[L, m, n]`` are one leaf and move
  together.
  """
  offsets: list[int | None] = [None if p is None else 0 for p in plans]
  if not stagger or update_proj_gap == 1:
    return offsets
  load = [0] * update_proj_gap
  order = sorted((i for i, p in enumerate(plans) if p is not None), key=lambda i: (-refresh_work(plans[i]), i))
  for i in order:
    o = min(range(update_proj_gap), key=lambda j: (load[j], j))
    load[o] += refresh_work(plans[i])
    offsets[i] = o
  return offsets


def is_due(count: jax.Array, offset: int, update_proj_gap: int) -> jax.Array:
  """Whether a leaf with refresh ``offset`` refreshes at step ``count`` (see :func:`refresh_offsets`)."""
  if offset == 0:
    return count % update_proj_gap == 0
  return (count == 0) | ((count - offset) % update_proj_gap == 0)


def refresh_groups(plans: Sequence[LeafPlan | None], bases, indices, same_batch_shape: bool) -> dict[Any, list[int]]:
  """Leaves whose refreshes are one computation: equal ``(m, n)``, rank, sides, basis dtypes (and batch shape)."""
  groups: dict[Any, list[int]] = {}
  for i in indices:
    p = plans[i]
    dtypes = tuple(None if q is None else jnp.dtype(q.dtype) for q in bases[i])
    batch = p.batch_shape if same_batch_shape else None
    groups.setdefault((batch, p.m, p.n, p.rank, p.sides, dtypes), []).append(i)
  return groups


def group_size(plans: Sequence[LeafPlan | None], group: Sequence[int]) -> int:
  """Matrices in a group of leaves."""
  return sum(math.prod(plans[i].batch_shape) for i in group)
