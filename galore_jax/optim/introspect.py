"""Reading a GaLore state from outside: where its states are, how big, and how much a refresh moved.

For metrics, the dry run and benchmarks; nothing here changes a state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from galore_jax.optim.basis import Basis, load_basis, subspace_overlap
from galore_jax.optim.plan import path_str
from galore_jax.optim.transform import GaLoreState


def tree_bytes(tree) -> int:
  """Bytes of the arrays (or ``ShapeDtypeStruct`` s) in ``tree``."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def galore_states(opt_state) -> list[GaLoreState]:
  """Every :class:`~galore_jax.GaLoreState` inside an optimizer state (a chain, a per-layer dict, ...)."""
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
          if isinstance(s, GaLoreState)]


def state_breakdown(opt_state) -> dict[str, int]:
  """Bytes of an optimizer state split into low-rank moments, projector bases, update-rule states (e.g. Fira's and
  APOLLO's limiter norms, one number per matrix) and full-rank states (everything else: the other leaves' moments,
  counters)."""
  galore = galore_states(opt_state)
  bases = sum(tree_bytes(s.bases) for s in galore)
  rules = sum(tree_bytes(s.rule_state) for s in galore)
  low_rank = 0
  for s in galore:
    targeted = set(s.bases)
    for path, leaf in jax.tree_util.tree_flatten_with_path(s.inner_state)[0]:
      name = path_str(path)
      if any(f"/{t}/" in f"/{name}/" for t in targeted):  # also 8-bit moments (.../kernel/codes)
        low_rank += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
  total = tree_bytes(opt_state)
  return {"moments_low_rank": low_rank, "projector_bases": bases, "rule_states": rules,
          "full_rank_states": total - low_rank - bases - rules}


def _replaced(new: Basis, old: Basis) -> jax.Array:
  """Whether a refresh replaced the basis (its first column moved: a new SVD never reproduces it bit for bit)."""
  return jnp.any(jnp.stack([jnp.any(n[..., 0] != o[..., 0]) for n, o in zip(new, old) if n is not None]))


def refresh_overlap_sum(old_opt_state, new_opt_state) -> tuple[jax.Array, jax.Array]:
  """``(sum, count)`` over the bases this step's refresh replaced of their subspace overlaps: the parts that
  :func:`refresh_overlap` divides, so that states updated piece by piece (layerwise) can be summed as they go."""
  olds, news = galore_states(old_opt_state), galore_states(new_opt_state)
  pairs = [(load_basis(o), load_basis(n)) for old, new in zip(olds, news)
           for o, n in zip(old.bases.values(), new.bases.values())]
  if not pairs:
    return jnp.float32(0), jnp.float32(0)
  # count is one step number, or one per layer (all equal) for a state stacked over layers
  changed = jnp.stack([_replaced(n, o) for o, n in pairs]) & jnp.all(olds[0].count > 0)

  def total(_):
    overlaps = jnp.stack([subspace_overlap(n, o) for o, n in pairs])
    return jnp.sum(jnp.where(changed, overlaps, 0.0))

  return jax.lax.cond(jnp.any(changed), total, lambda _: jnp.float32(0), None), jnp.sum(changed.astype(jnp.float32))


def refresh_overlap(old_opt_state, new_opt_state) -> jax.Array:
  """Mean subspace overlap (in [0, 1]) of the bases this step's refresh replaced; NaN when none was.

  Per leaf, so it is right under ``stagger`` and ``adaptive_gap`` too. The first refresh replaces
  placeholder bases and reports NaN.
  """
  total, count = refresh_overlap_sum(old_opt_state, new_opt_state)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.float32(jnp.nan))
