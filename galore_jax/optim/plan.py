"""Which leaves of a tree are projected, and how each is viewed as a batch of matrices.

Everything here is static (shapes and paths only): a :class:`TreePlan` is computed from a tree of
arrays or ``ShapeDtypeStruct`` s, identically at ``init`` and at every ``update``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from galore_jax.optim.basis import Sides, choose_sides, clipped_rank

DEFAULT_TARGET = r"attn|mlp"


class NothingTargetedWarning(UserWarning):
  """GaLore was given a tree in which its ``target`` selects no leaf: it then only runs the inner transformation.

  Silence it where that is intended: ``warnings.filterwarnings("ignore", category=NothingTargetedWarning)``.
  """


class GaLoreDimensionNumbers(NamedTuple):
  """Which axes of a kernel form the matrix; every other axis is a batch axis.

  The default, ``(-2, -1)``, is a Flax ``Linear`` kernel ``[..., in, out]`` with
  any leading axes (stacked or scanned layers) as batch axes. A Flax
  ``Einsum``/``LinearGeneral`` kernel ``[embed, heads, head_dim]`` of a query
  projection is ``GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))``.
  """

  reduction_axis: Sequence[int] | int = -2
  output_axis: Sequence[int] | int = -1


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one targeted leaf is reshaped to ``[*batch, m, n]`` and projected. Static (shapes only)."""

  path: str
  shape: tuple[int, ...]
  perm: tuple[int, ...]
  batch_shape: tuple[int, ...]
  reduction_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  rank: int
  sides: Sides

  @property
  def m(self) -> int:
    return math.prod(self.reduction_shape)

  @property
  def n(self) -> int:
    return math.prod(self.output_shape)

  @property
  def matrices(self) -> int:
    """How many matrices (batch elements) the leaf holds."""
    return math.prod(self.batch_shape)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.m, self.n)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    return (*self.batch_shape, self.rank if self.sides.input else self.m, self.rank if self.sides.output else self.n)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    return jnp.transpose(x, self.perm).reshape(self.matrix_shape)

  def from_matrix(self, x: jax.Array) -> jax.Array:
    inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
    return x.reshape(*self.batch_shape, *self.reduction_shape, *self.output_shape).transpose(inverse)


class TreePlan(NamedTuple):
  """A tree's plan: its structure, a :class:`LeafPlan` or ``None`` per leaf, and each leaf's key path."""

  treedef: Any
  leaves: list[LeafPlan | None]
  keypaths: list[tuple]

  @property
  def targeted(self) -> list[int]:
    """Indices of the projected leaves, in tree order."""
    return [i for i, p in enumerate(self.leaves) if p is not None]


def path_str(path: Sequence[Any]) -> str:
  """A key path as ``'/'``-joined names, e.g. ``layers/0/attn/q_proj/kernel``.

  The trailing ``value`` attribute that Flax NNX variables add is dropped.
  """
  path = tuple(path)
  if path and getattr(path[-1], "name", None) == "value":
    path = path[:-1]
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _default_target(path: str, leaf) -> bool:
  return jnp.ndim(leaf) >= 2 and re.search(DEFAULT_TARGET, path) is not None


def _compiled(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"target {pattern!r} is not a regular expression: {e}") from None


def _target_flags(target, paths: list[str], leaves: list, treedef) -> list[bool]:
  """Whether each leaf is targeted. Patterns (the default too) select matrices only: a ``bias`` under a
  matching path is not an error; a callable or a tree of bools selects exactly what it says."""
  if target is None:
    return [_default_target(p, x) for p, x in zip(paths, leaves)]
  if isinstance(target, str):
    target = [target]
  if isinstance(target, (list, tuple)) and all(isinstance(t, str) for t in target):
    patterns = [_compiled(t) for t in target]
    return [jnp.ndim(x) >= 2 and any(p.search(path) for p in patterns) for path, x in zip(paths, leaves)]
  if callable(target):
    return [bool(target(p, x)) for p, x in zip(paths, leaves)]
  try:
    flags = treedef.flatten_up_to(target)
  except (ValueError, TypeError) as e:
    raise TypeError(f"target: a tree of bools must have the parameters' structure ({e})") from None
  return [bool(f) for f in flags]


def _dimension_numbers(dimension_numbers, paths, leaves, treedef) -> list:
  if dimension_numbers is None:
    return [GaLoreDimensionNumbers()] * len(leaves)
  if isinstance(dimension_numbers, GaLoreDimensionNumbers):
    return [dimension_numbers] * len(leaves)
  if callable(dimension_numbers):
    return [dimension_numbers(p, x) for p, x in zip(paths, leaves)]
  return treedef.flatten_up_to(dimension_numbers)


def _normalize_axes(axes, ndim: int, path: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(f"dimension_numbers: axis {ax} out of range for leaf {path!r} with ndim {ndim}")
  return tuple(ax % ndim for ax in axes)


def plan_leaf(path: str, shape: tuple[int, ...], dims: GaLoreDimensionNumbers, rank, proj_type: str) -> LeafPlan:
  """The plan of one targeted leaf; raises ValueError naming the path when it cannot be projected."""
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"target selects leaf {path!r} of shape {shape}: GaLore needs ndim >= 2")
  if not isinstance(dims, GaLoreDimensionNumbers):
    raise TypeError(f"dimension_numbers for leaf {path!r} must be GaLoreDimensionNumbers, got {dims!r}")
  reduction = _normalize_axes(dims.reduction_axis, ndim, path)
  output = _normalize_axes(dims.output_axis, ndim, path)
  if (not reduction or not output or set(reduction) & set(output) or len(set(reduction)) < len(reduction)
      or len(set(output)) < len(output)):
    raise ValueError(f"dimension_numbers {dims} for leaf {path!r}: reduction and output axes must be non-empty "
                     "and disjoint")
  batch = tuple(ax for ax in range(ndim) if ax not in reduction and ax not in output)
  r = rank(path, shape) if callable(rank) else rank
  if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
    raise ValueError(f"rank for leaf {path!r} must be a positive int, got {r!r}")
  m = math.prod(shape[a] for a in reduction)
  n = math.prod(shape[a] for a in output)
  return LeafPlan(
      path=path,
      shape=tuple(shape),
      perm=batch + reduction + output,
      batch_shape=tuple(shape[a] for a in batch),
      reduction_shape=tuple(shape[a] for a in reduction),
      output_shape=tuple(shape[a] for a in output),
      rank=clipped_rank(int(r), m, n),
      sides=choose_sides(proj_type, m, n),
  )


def plan_leaves(tree, *, target=None, rank=128, dimension_numbers=None, proj_type="std") -> TreePlan:
  """Decide, per leaf of ``tree``, whether and how it is projected.

  Returns a :class:`TreePlan` (unpacks as ``treedef, plans, keypaths``) with a
  :class:`LeafPlan` for each targeted leaf and ``None`` for the others, in
  ``jax.tree.flatten`` order.
  """
  keyed, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_str(k) for k, _ in keyed]
  leaves = [x for _, x in keyed]
  flags = _target_flags(target, paths, leaves, treedef)
  dims = _dimension_numbers(dimension_numbers, paths, leaves, treedef)
  plans = [
      plan_leaf(p, tuple(jnp.shape(x)), d if d is not None else GaLoreDimensionNumbers(), rank, proj_type)
      if flag else None
      for p, x, d, flag in zip(paths, leaves, dims, flags)
  ]
  targeted = [p.path for p in plans if p]
  if len(set(targeted)) < len(targeted):
    raise ValueError(f"targeted leaves must have distinct '/'-joined paths, got {targeted}")
  return TreePlan(treedef, plans, [k for k, _ in keyed])


def warn_if_nothing_targeted(plan: TreePlan, tree, target) -> None:
  """Say so when a tree with matrices has none selected (e.g. the default ``attn|mlp`` on other path names)."""
  if plan.targeted or not any(jnp.ndim(x) >= 2 for x in jax.tree.leaves(tree)):
    return
  paths = [path_str(k) for k in plan.keypaths][:4]
  shown = f"target {target!r}" if target is not None else f"the default target {DEFAULT_TARGET!r}"
  warnings.warn(f"galore: {shown} selects no leaf of this tree (paths like {paths}), so nothing is projected; "
                "pass target= (a regex, a list of them, a callable or a tree of bools)", NothingTargetedWarning,
                stacklevel=4)
