"""GaLore as an optax gradient transformation.

``galore(inner)`` projects the gradient of every targeted weight matrix onto a
rank-``r`` subspace, runs ``inner`` (Adam by default) on the projected tree and
projects the result back. Everything else goes through ``inner`` at full rank.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from galore_jax import projection
from galore_jax.adam import decay_updated_weights, scale_by_adam_hf
from galore_jax.projection import Basis, RefreshFn, Sides

DEFAULT_TARGET = r"attn|mlp"
ON_REFRESH = ("keep", "reset", "project")
_SECOND_MOMENT_NAMES = frozenset({"nu", "v", "exp_avg_sq", "second_moment"})


class GaLoreDimensionNumbers(NamedTuple):
  """Which axes of a kernel form the matrix; every other axis is a batch axis.

  The default, ``(-2, -1)``, is a Flax ``Linear`` kernel ``[..., in, out]`` with
  any leading axes (stacked or scanned layers) as batch axes. A Flax
  ``Einsum``/``LinearGeneral`` kernel ``[embed, heads, head_dim]`` of a query
  projection is ``GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))``.
  """

  reduction_axis: Sequence[int] | int = -2
  output_axis: Sequence[int] | int = -1


class GaLoreState(NamedTuple):
  """State of :func:`galore`.

  Attributes:
    count: completed steps (int32); a step refreshes the bases when
      ``count % update_proj_gap == 0`` (with ``stagger``, per leaf, see
      :func:`refresh_offsets`).
    bases: ``{path: Basis}`` for the targeted leaves only, keyed by the
      ``'/'``-joined key path (no placeholders for other leaves, so orbax can
      save it; a plain dict, so parameter containers such as NNX variables do
      not wrap it).
    inner_state: the state of the inner transformation, whose targeted leaves
      have their low-rank shapes.
    schedule: ``None``, or with ``adaptive_gap`` ``{path: int32[2]}`` holding
      each targeted leaf's current gap and the step of its next refresh.
  """

  count: jax.Array
  bases: Any
  inner_state: optax.OptState
  schedule: Any = None


@dataclasses.dataclass(frozen=True)
class AdaptiveGap:
  """Per-leaf adaptive refresh gap, after Q-GaLore (which doubles the gap when successive top singular
  vectors keep a cosine ≥ 0.4).

  At every refresh after the first, the new basis of a leaf is compared with the one it replaces by the
  chance-normalised overlap ``(o - c) / (1 - c)``, where ``o`` is
  :func:`~galore_jax.projection.subspace_overlap` (mean squared cosine of the principal angles, over all
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


# ----------------------------------------------------------------------------- which leaves, how


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


def _target_flags(target, paths: list[str], leaves: list, treedef) -> list[bool]:
  if target is None:
    return [_default_target(p, x) for p, x in zip(paths, leaves)]
  if isinstance(target, str):
    target = [target]
  if isinstance(target, (list, tuple)) and all(isinstance(t, str) for t in target):
    patterns = [re.compile(t) for t in target]
    return [any(p.search(path) for p in patterns) for path in paths]
  if callable(target):
    return [bool(target(p, x)) for p, x in zip(paths, leaves)]
  try:
    flags = treedef.flatten_up_to(target)
  except (ValueError, TypeError) as e:
    raise TypeError(f"target: a tree of bools must have the parameters' structure ({e})") from None
  return [bool(f) for f in flags]


def _normalize_axes(axes, ndim: int, path: str) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  for ax in axes:
    if not -ndim <= ax < ndim:
      raise ValueError(f"dimension_numbers: axis {ax} out of range for leaf {path!r} with ndim {ndim}")
  return tuple(ax % ndim for ax in axes)


def _plan_leaf(path: str, shape: tuple[int, ...], dims: GaLoreDimensionNumbers, rank, proj_type: str) -> LeafPlan:
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"target selects leaf {path!r} of shape {shape}: GaLore needs ndim >= 2")
  if not isinstance(dims, GaLoreDimensionNumbers):
    raise TypeError(f"dimension_numbers for leaf {path!r} must be GaLoreDimensionNumbers, got {dims!r}")
  reduction = _normalize_axes(dims.reduction_axis, ndim, path)
  output = _normalize_axes(dims.output_axis, ndim, path)
  if not reduction or not output or set(reduction) & set(output) or len(set(reduction)) < len(reduction) or len(
      set(output)) < len(output):
    raise ValueError(f"dimension_numbers {dims} for leaf {path!r}: reduction and output axes must be non-empty and disjoint")
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
      rank=projection.clipped_rank(int(r), m, n),
      sides=projection.choose_sides(proj_type, m, n),
  )


def plan_leaves(tree, *, target=None, rank=128, dimension_numbers=None, proj_type="std"):
  """Decide, per leaf of ``tree``, whether and how it is projected.

  Returns ``(treedef, plans)`` with a :class:`LeafPlan` for each targeted leaf
  and ``None`` for the others, in ``jax.tree.flatten`` order.
  """
  keyed, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [path_str(k) for k, _ in keyed]
  leaves = [x for _, x in keyed]
  flags = _target_flags(target, paths, leaves, treedef)
  if dimension_numbers is None:
    dims = [GaLoreDimensionNumbers()] * len(leaves)
  elif isinstance(dimension_numbers, GaLoreDimensionNumbers):
    dims = [dimension_numbers] * len(leaves)
  elif callable(dimension_numbers):
    dims = [dimension_numbers(p, x) for p, x in zip(paths, leaves)]
  else:
    dims = treedef.flatten_up_to(dimension_numbers)
  plans = [
      _plan_leaf(p, tuple(jnp.shape(x)), d if d is not None else GaLoreDimensionNumbers(), rank, proj_type)
      if flag else None
      for p, x, d, flag in zip(paths, leaves, dims, flags)
  ]
  targeted = [p.path for p in plans if p]
  if len(set(targeted)) < len(targeted):
    raise ValueError(f"targeted leaves must have distinct '/'-joined paths, got {targeted}")
  return treedef, plans, [k for k, _ in keyed]


# ----------------------------------------------------------------------------- the transformation


class _NotParams:
  """A leaf standing for state that is not shaped like the parameters (for optax.tree_map_params)."""


def _is_params_placeholder(params) -> bool:
  """optax.tree_map_params calls init on one opaque object: a pytree node without children."""
  if params is None or isinstance(params, (dict, list, tuple)) or hasattr(params, "shape"):
    return False
  return jax.tree.structure(params).num_leaves == 0


def _check_arguments(rank, update_proj_gap, proj_type, on_refresh):
  if isinstance(rank, jax.Array):
    raise TypeError("rank must be a static int; with optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap')")
  if not callable(rank) and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0):
    raise ValueError(f"rank must be a positive int or a callable (path, shape) -> int, got {rank!r}")
  if isinstance(update_proj_gap, jax.Array):
    raise TypeError("update_proj_gap must be a static int; with optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap')")
  if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, numbers.Integral) or update_proj_gap <= 0:
    raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
  if proj_type not in projection.PROJ_TYPES:
    raise ValueError(f"proj_type={proj_type!r} is not one of {projection.PROJ_TYPES}")
  if on_refresh not in ON_REFRESH:
    raise ValueError(f"on_refresh={on_refresh!r} is not one of {ON_REFRESH}")


REFRESH_METHODS = {
    "svd": projection.exact_refresh,
    "randomized": projection.RandomizedRefresh(),
    "randomized_warm": projection.RandomizedRefresh(iterations=0, warm_start=True),
}
_REFRESH_KEYWORDS = ("key", "warm")


def _refresh_fn(refresh) -> RefreshFn:
  if callable(refresh):
    return refresh
  if refresh not in REFRESH_METHODS:
    raise ValueError(f"refresh={refresh!r} is not one of {tuple(REFRESH_METHODS)} or a callable")
  return REFRESH_METHODS[refresh]


def finish_chunk(members: int, member_bytes: int, budget_bytes: int) -> int:
  """Members per batched finish of a two-stage refresh: the largest divisor of ``members`` whose sketches fit the budget (≥ 1)."""
  return max(d for d in range(1, members + 1) if members % d == 0 and (d == 1 or d * member_bytes <= budget_bytes))


def _is_two_stage(refresh) -> bool:
  """A refresh with ``sketch(grad, previous, rank, *, key, warm)`` and ``finish(sketches, previous, rank, *, warm)``."""
  return callable(getattr(refresh, "sketch", None)) and callable(getattr(refresh, "finish", None))


def _refresh_keywords(fn) -> frozenset[str]:
  """The optional keywords (``key``, ``warm``) a refresh callable accepts; plain 3-argument callables get none."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return frozenset()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return frozenset(_REFRESH_KEYWORDS)
  return frozenset(p.name for p in params if p.name in _REFRESH_KEYWORDS and p.kind in (
      inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def refresh_offsets(plans: Sequence[LeafPlan | None], update_proj_gap: int, stagger: bool) -> list[int | None]:
  """Per leaf, the phase of its refresh schedule in ``[0, update_proj_gap)`` (``None`` for untargeted leaves).

  A leaf with offset ``o`` refreshes on step 0 and on every step ``t > 0`` with
  ``(t - o) % update_proj_gap == 0``, so after the first step it refreshes exactly
  once in any ``update_proj_gap`` consecutive steps. Without stagger every offset
  is 0 (the reference's schedule). With stagger the leaves are spread over the
  offsets by cost, largest first, each onto the offset with the least refresh
  work so far (``batch · m · n · min(m, n)``); ties go to the lowest offset, so a
  single leaf keeps offset 0. Stacked layers ``[L, m, n]`` are one leaf and move
  together.
  """
  offsets: list[int | None] = [None if p is None else 0 for p in plans]
  if not stagger or update_proj_gap == 1:
    return offsets
  load = [0] * update_proj_gap
  order = sorted((i for i, p in enumerate(plans) if p is not None),
                 key=lambda i: (-math.prod(plans[i].batch_shape) * plans[i].m * plans[i].n * min(plans[i].m, plans[i].n), i))
  for i in order:
    o = min(range(update_proj_gap), key=lambda j: (load[j], j))
    p = plans[i]
    load[o] += math.prod(p.batch_shape) * p.m * p.n * min(p.m, p.n)
    offsets[i] = o
  return offsets


def _due(count: jax.Array, offset: int, update_proj_gap: int) -> jax.Array:
  """Whether a leaf with refresh ``offset`` refreshes at step ``count`` (see :func:`refresh_offsets`)."""
  if offset == 0:
    return count % update_proj_gap == 0
  return (count == 0) | ((count - offset) % update_proj_gap == 0)


def _refresh_groups(plans, bases, indices, same_batch_shape: bool) -> dict[Any, list[int]]:
  """Leaves whose refreshes are one computation: equal ``(m, n)``, rank, sides, basis dtypes (and batch shape)."""
  groups: dict[Any, list[int]] = {}
  for i in indices:
    p = plans[i]
    dtypes = tuple(None if q is None else jnp.dtype(q.dtype) for q in bases[i])
    batch = p.batch_shape if same_batch_shape else None
    groups.setdefault((batch, p.m, p.n, p.rank, p.sides, dtypes), []).append(i)
  return groups


def _moment_slots(inner_state, keypaths, plans):
  """Find the inner state's leaves that are moments of targeted leaves: ``{state leaf index: (plan index, squared)}``.

  A moment is a leaf whose key path ends with the parameter's key path and whose
  shape is the low-rank one; it is a second moment when a field on its path is
  named like one (``nu``, ``v``, ``exp_avg_sq``, ``second_moment``).
  """
  slots = {}
  state_keyed = jax.tree_util.tree_flatten_with_path(inner_state)[0]
  for i, (state_path, leaf) in enumerate(state_keyed):
    for j, plan in enumerate(plans):
      suffix = keypaths[j]
      if plan is None or len(state_path) < len(suffix) or tuple(state_path[len(state_path) - len(suffix):]) != tuple(suffix):
        continue
      if tuple(jnp.shape(leaf)) != plan.low_rank_shape:
        continue
      prefix = path_str(state_path[:len(state_path) - len(suffix)]).split("/")
      slots[i] = (j, any(name in _SECOND_MOMENT_NAMES for name in prefix))
      break
  return slots


def galore(
    inner: optax.GradientTransformation | None = None,
    *,
    rank: int | Callable[[str, tuple[int, ...]], int] = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    target: Any = None,
    dimension_numbers: Any = None,
    on_refresh: str = "keep",
    basis_dtype: jax.typing.DTypeLike = "float32",
    refresh: str | RefreshFn = "svd",
    refresh_seed: int = 0,
    stagger: bool = False,
    batch_refresh: bool = False,
    adaptive_gap: AdaptiveGap | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient low-rank projection (GaLore) around an inner transformation.

  For each targeted leaf with gradient :math:`G_t \in \mathbb{R}^{m\times n}`
  (Flax layout: input dimension ``m``, output dimension ``n``)

  .. math::
    Q_t &= \mathrm{topr\text{-}SVD}(G_t) \text{ if } t \bmod T = 0 \text{ else } Q_{t-1} \\
    R_t &= Q_t^\top G_t \quad (\text{or } G_t Q_t \text{, or both sides}) \\
    U_t &= \alpha \, Q_t \, \mathrm{inner}(R_t)

  where ``t`` counts completed steps (so the first update computes the bases),
  the SVD runs in fp32 inside ``jax.lax.cond`` (a step that does not refresh
  does no SVD work), and the inner transformation's moments live in the
  ``r``-dimensional space. Non-targeted leaves go through ``inner`` at full rank
  and are not scaled by ``α``. Composing with a learning rate gives the
  reference's step ``W ← W − η U_t``.

  Args:
    inner: the transformation run in the subspace; default
      :func:`optax.scale_by_adam`. It receives no ``params`` (their shapes differ
      from the low-rank updates): put weight decay after ``galore`` in the chain.
    rank: ``r``, or a callable ``(path, shape) -> int`` for per-leaf ranks;
      clipped to ``min(m, n)`` as in the reference. Static.
    update_proj_gap: ``T``, steps between refreshes. Static.
    scale: ``α``, multiplies the projected-back update (reference default 0.25).
      May be injected with :func:`optax.inject_hyperparams`.
    proj_type: which side is projected, with the reference's meaning on the torch
      weight ``W = Kᵀ``: ``std`` the smaller of in/out (input when square),
      ``reverse_std`` the larger, ``left`` the output dimension, ``right`` the
      input dimension, ``full`` both.
    target: which leaves are projected: ``None`` (leaves with ``ndim >= 2`` whose
      ``'/'``-joined key path contains ``attn`` or ``mlp``, as the reference's
      script), a regex or list of regexes searched in the path, a callable
      ``(path, leaf) -> bool``, or a tree of bools like the parameters.
    dimension_numbers: :class:`GaLoreDimensionNumbers`, a tree of them (``None``
      entries = default), or a callable ``(path, leaf) -> GaLoreDimensionNumbers``.
      Default: the last two axes are ``(in, out)``, leading axes are batch axes
      with one basis each.
    on_refresh: what happens to the inner state's moments when a basis changes:
      ``keep`` (reference: moments stay as they are, in the old coordinates),
      ``reset`` (zeroed; the inner step counter keeps running), ``project``
      (first moment carried into the new basis by :math:`C = Q_{new}^\top Q_{old}`;
      the second moment, which no linear map carries exactly, is mapped by the
      elementwise square :math:`C\circ C`, exact for permutations and sign
      flips and non-negative always).
    basis_dtype: storage dtype of the bases (the SVD itself is always fp32);
      ``jnp.bfloat16`` reproduces the reference's pure-bf16 runs.
    refresh: how bases are recomputed: ``"svd"`` (the reference's exact SVD),
      ``"randomized"`` (:class:`~galore_jax.projection.RandomizedRefresh`: range
      finder with 10 oversampling columns and 1 LU-stabilised power iteration),
      ``"randomized_warm"`` (test matrix seeded by the previous basis plus 10
      random columns, no power iteration), or a callable ``(grad_fp32 [..., m, n], previous_basis, rank) -> Basis``
      such as ``ExactRefresh(svd_algorithm="jacobi")`` or
      ``RandomizedRefresh(oversampling=..., iterations=..., warm_start=...)``
      (list it in ``static_args`` of :func:`optax.inject_hyperparams`). A callable
      that accepts the keywords ``key`` (a PRNG key, or keys with the batch shape)
      and/or ``warm`` (False on step 0, when the previous basis is a placeholder)
      receives them.
    refresh_seed: seed of the refresh's random test matrices: at step ``t`` the
      ``k``-th matrix of the tree (leaves in tree order, a stacked leaf counting
      one matrix per batch element) draws from ``split(fold_in(key(refresh_seed), t))[k]``,
      so the bases are a deterministic function of the step, whatever the grouping.
    stagger: spread the leaves' refreshes over the gap so that no single step
      pays for all of them (see :func:`refresh_offsets`): every leaf still
      refreshes on step 0, then leaf ``i`` on the steps ``t`` with
      ``(t - offset_i) % update_proj_gap == 0``.
    batch_refresh: refresh the leaves with equal ``(m, n, rank, sides)`` that
      refresh on the same step in one batched call (stacked along a new leading
      axis; one ``lax.cond`` per offset). Costs a stacked fp32 copy of those
      gradients while the refresh runs. Without it, each group of leaves with
      equal shapes gets one ``lax.cond`` (taken when any member is due) around a
      ``fori_loop`` over its members, so the program holds one copy of the
      refresh per distinct shape, not one per leaf: that is what keeps the
      compile time of a 100-layer model near AdamW's. When the refresh has two
      stages (``sketch`` and ``finish`` methods, as
      :class:`~galore_jax.projection.RandomizedRefresh`) and every member is
      due (no ``stagger``), the loop only sketches and the small factorisations
      of the group run as one batched call per chunk (see
      ``RandomizedRefresh.batch_budget_bytes``).
    adaptive_gap: ``None`` (fixed gap) or :class:`AdaptiveGap`: each leaf keeps
      its own gap in ``GaLoreState.schedule`` and lengthens it while its
      subspace stays put. Leaves are grouped and looped over as without it
      (each leaf refreshes when its own next step comes), and ``batch_refresh``
      does not apply. ``stagger`` sets the first refresh after
      step 0 (at the leaf's offset).

  A refresh on a non-finite gradient keeps the previous basis of that matrix
  (batch element by batch element) instead of failing in the SVD; the bases
  start as leading unit vectors, so they are always orthonormal. Wrap the chain
  in :func:`optax.apply_if_finite` to protect the moments as well.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with :class:`GaLoreState`.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from galore_jax import galore
    >>> tx = optax.chain(galore(rank=2, update_proj_gap=10), optax.scale(-1e-2))
    >>> params = {'mlp': {'kernel': jnp.ones((4, 3))}, 'norm': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)

  References:
    Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection*, ICML 2024 (arXiv:2403.03507).
  """
  _check_arguments(rank, update_proj_gap, proj_type, on_refresh)
  if adaptive_gap is not None and not isinstance(adaptive_gap, AdaptiveGap):
    raise TypeError(f"adaptive_gap must be None or an AdaptiveGap, got {adaptive_gap!r}")
  max_gap = None if adaptive_gap is None else (adaptive_gap.max_gap or 8 * update_proj_gap)
  refresh = _refresh_fn(refresh)
  refresh_keywords = _refresh_keywords(refresh)
  basis_dtype = jnp.dtype(basis_dtype)
  inner = optax.with_extra_args_support(inner if inner is not None else optax.scale_by_adam())
  plan = lambda tree: plan_leaves(tree, target=target, rank=rank, dimension_numbers=dimension_numbers, proj_type=proj_type)

  def init_fn(params):
    if _is_params_placeholder(params):
      # optax.tree_map_params probes init with a placeholder: no leaf of this state is parameter-shaped.
      return GaLoreState(count=jnp.zeros([], jnp.int32), bases=_NotParams(), inner_state=_NotParams(),
                         schedule=None if adaptive_gap is None else _NotParams())
    treedef, plans, _ = plan(params)
    leaves = treedef.flatten_up_to(params)
    bases = {p.path: projection.identity_basis(p.matrix_shape, p.rank, p.sides, basis_dtype) for p in plans if p}
    low = [
        jnp.zeros(p.low_rank_shape, jnp.result_type(x.dtype, basis_dtype)) if p else x
        for p, x in zip(plans, leaves)
    ]
    schedule = None if adaptive_gap is None else {
        p.path: jnp.array([update_proj_gap, 0], jnp.int32) for p in plans if p}
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        bases=bases,
        inner_state=inner.init(treedef.unflatten(low)),
        schedule=schedule,
    )

  def matrix_keys(key, plans):
    """Per leaf, its matrices' PRNG keys (batch-shaped, or one key): matrix ``k`` of the tree gets ``split(key)[k]``.

    One split for the whole tree, so a matrix's draw depends on the step and its
    place in the tree only, never on how the refreshes are grouped or staggered.
    """
    sizes = [0 if p is None else math.prod(p.batch_shape) for p in plans]
    every = jax.random.split(key, max(sum(sizes), 1))
    keys, start = [], 0
    for p, size in zip(plans, sizes):
      if p is not None:
        keys.append(every[start:start + size].reshape(p.batch_shape) if p.batch_shape else every[start])
      else:
        keys.append(None)
      start += size
    return keys

  def call_refresh(g32s, olds, keys, warm, rank):
    kwargs = {}
    if "key" in refresh_keywords:
      kwargs["key"] = keys
    if "warm" in refresh_keywords:
      kwargs["warm"] = warm
    return refresh(projection.replicated(g32s), Basis(*(None if q is None else projection.replicated(q) for q in olds)),
                   rank, **kwargs)

  def finite_fp32(g):
    """``(fp32 copy of g with non-finite matrices zeroed, per-matrix finiteness [...])``."""
    finite = jnp.all(jnp.isfinite(g), axis=(-2, -1))
    return jnp.where(finite[..., None, None], g.astype(jnp.float32), 0.0), finite

  def keep_unless_changed(new, old, changed):
    return Basis(*(None if q_old is None else jnp.where(changed[..., None, None], q_new.astype(q_old.dtype), q_old)
                   for q_new, q_old in zip(new, old)))

  def batched_refresh(ops, members, plans, slots):
    """Refresh ``members`` (plan indices): one batched call per group of equal shapes (``batch_refresh``).

    ``ops`` = ``(gradients, bases, moments, key, warm)``, the first three holding
    the members' entries only (moments by inner-state leaf index).
    """
    grads, bases, moments, key, warm = ops
    changed, g32 = {}, {}
    for i in members:
      g32[i], changed[i] = finite_fp32(grads[i])
    keys = matrix_keys(key, plans) if "key" in refresh_keywords else [None] * len(plans)
    fresh = {}
    for group in _refresh_groups(plans, bases, members, same_batch_shape=False).values():
      rank_ = plans[group[0]].rank
      if len(group) == 1:
        i = group[0]
        fresh[i] = call_refresh(g32[i], bases[i], keys[i], warm, rank_)
        continue
      flat = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])
      stacked_g = jnp.concatenate([flat(g32[i]) for i in group])
      stacked_b = Basis(*(None if bases[group[0]][s_] is None else jnp.concatenate([flat(bases[i][s_]) for i in group])
                          for s_ in range(2)))
      stacked_k = None if keys[group[0]] is None else jnp.concatenate([jnp.reshape(keys[i], (-1,)) for i in group])
      out = call_refresh(stacked_g, stacked_b, stacked_k, warm, rank_)
      start = 0
      for i in group:
        size = math.prod(plans[i].batch_shape)
        fresh[i] = Basis(*(None if q is None else q[start:start + size].reshape(*plans[i].batch_shape, *q.shape[-2:])
                           for q in out))
        start += size
    new_bases = {i: keep_unless_changed(fresh[i], bases[i], changed[i]) for i in members}
    return new_bases, _carry_moments(moments, slots, bases, new_bases, changed)

  def looped_refresh(ops, group, due, plans, slots):
    """Refresh the leaves of one shape group by a ``fori_loop`` over them: one copy of the refresh in the program.

    ``ops`` = ``(gradients, bases, moments, key, warm)``, the first three holding
    the group's entries only. ``due`` holds each member's schedule predicate; a
    member that is not due is skipped (stagger) and keeps its basis and moments.
    The loop picks a member's gradient with ``lax.switch``, so only one fp32
    gradient copy exists at a time.
    """
    grads, bases, moments, key, warm = ops
    keys = matrix_keys(key, plans) if "key" in refresh_keywords else [None] * len(plans)
    rank_ = plans[group[0]].rank
    finite = {i: jnp.all(jnp.isfinite(grads[i]), axis=(-2, -1)) for i in group}
    always_due = all(isinstance(due[i], bool) for i in group)
    loaders = [lambda i=i: (finite_fp32(grads[i])[0], bases[i]) for i in group]
    stacked_keys = None if keys[group[0]] is None else jnp.stack([keys[i] for i in group])
    if len(group) == 1:
      (i,) = group
      fresh = {i: call_refresh(finite_fp32(grads[i])[0], bases[i], keys[i], warm, rank_)}
    elif always_due and _is_two_stage(refresh):
      fresh = dict(zip(group, sketched_refresh(loaders, stacked_keys, bases[group[0]], warm, rank_)))
    else:
      due_now = None if always_due else jnp.stack([jnp.asarray(due[i]) for i in group])

      def body(j, outs):
        g, old = jax.lax.switch(j, loaders)
        run = lambda: Basis(*(None if q is None else q.astype(o.dtype) for q, o in zip(
            call_refresh(g, old, None if stacked_keys is None else stacked_keys[j], warm, rank_), old)))
        new = run() if always_due else jax.lax.cond(due_now[j], run, lambda: old)
        return Basis(*(None if o is None else o.at[j].set(q) for o, q in zip(outs, new)))

      template = bases[group[0]]
      outs = jax.lax.fori_loop(0, len(group), body, Basis(*(
          None if q is None else jnp.zeros((len(group), *q.shape), q.dtype) for q in template)))
      fresh = {i: Basis(*(None if o is None else o[j] for o in outs)) for j, i in enumerate(group)}
    changed = {i: finite[i] & due[i] for i in group}
    new_bases = {i: keep_unless_changed(fresh[i], bases[i], changed[i]) for i in group}
    gates = None if always_due else due
    return new_bases, _carry_moments(moments, slots, bases, new_bases, changed, gates)

  def sketched_refresh(loaders, stacked_keys, template, warm, rank_):
    """New bases of a group whose members are all due, by a two-stage refresh (``sketch`` / ``finish``).

    A ``fori_loop`` sketches the members one at a time (one fp32 gradient copy
    at a time, as :func:`looped_refresh`), and each chunk of sketches is
    finished in one batched call: the small ``k×k`` factorisations then reach
    the solver as a batch (on GPU cuSOLVER's batched ``syev``) instead of one
    call per matrix. Chunks are equal and hold at most ``refresh.batch_budget_bytes``.
    """
    size = len(loaders)

    def one_sketch(j):
      g, old = jax.lax.switch(j, loaders)
      key = None if stacked_keys is None else stacked_keys[j]
      return refresh.sketch(projection.replicated(g), old, rank_, key=key, warm=warm), old

    shapes = jax.eval_shape(one_sketch, 0)
    per_member = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes[0]))
    chunk = finish_chunk(size, per_member, getattr(refresh, "batch_budget_bytes", projection.BATCH_BUDGET_BYTES))

    def chunk_body(c, outs):
      def sketch_body(j, bufs):
        return jax.tree.map(lambda buf, x: buf.at[j].set(x), bufs, one_sketch(c * chunk + j))

      empty = jax.tree.map(lambda x: jnp.zeros((chunk, *x.shape), x.dtype), shapes)
      sketches, olds = jax.lax.fori_loop(0, chunk, sketch_body, empty)
      new = refresh.finish(jax.tree.map(projection.replicated, sketches), olds, rank_, warm=warm)
      return Basis(*(None if o is None else jax.lax.dynamic_update_slice_in_dim(o, q.astype(o.dtype), c * chunk, 0)
                     for o, q in zip(outs, new)))

    outs = jax.lax.fori_loop(0, size // chunk, chunk_body, Basis(*(
        None if q is None else jnp.zeros((size, *q.shape), q.dtype) for q in template)))
    return [Basis(*(None if o is None else o[j] for o in outs)) for j in range(size)]

  def _carry_moments(moments, slots, old_bases, new_bases, changed, gates=None):
    """``on_refresh`` applied to ``moments`` ({inner-state leaf index: leaf}) whose bases changed."""
    out = dict(moments)
    for i, moment in moments.items():
      j, squared = slots[i]
      mask = changed[j][..., None, None]

      def carry(moment, j=j, squared=squared, mask=mask):
        if on_refresh == "reset":
          carried = jnp.zeros_like(moment)
        else:
          rotation = projection.change_of_basis(new_bases[j], old_bases[j])
          carried = projection.rotate(moment, rotation, squared=squared)
        return jnp.where(mask, carried, moment)

      gate = None if gates is None or isinstance(gates[j], bool) else gates[j]
      out[i] = carry(moment) if gate is None else jax.lax.cond(gate, carry, lambda m: m, moment)
    return out

  def update_fn(updates, state, params=None, **extra_args):
    del params
    treedef, plans, keypaths = plan(updates)
    grads = treedef.flatten_up_to(updates)
    matrices = [p.to_matrix(g) if p else g for p, g in zip(plans, grads)]
    bases = [state.bases[p.path] if p else None for p in plans]

    offsets = refresh_offsets(plans, update_proj_gap, stagger)
    key = jax.random.fold_in(jax.random.key(refresh_seed), state.count) if "key" in refresh_keywords else None
    warm = state.count > 0
    slots = {} if on_refresh == "keep" else _moment_slots(state.inner_state, keypaths, plans)
    state_leaves, state_def = jax.tree.flatten(state.inner_state)

    def refresh_under_cond(pred, members, branch, *extra):
      """``lax.cond(pred, branch)`` whose operands are the members' gradients, bases and moments only.

      The rest of the optimizer state never flows through the conditional, so
      XLA has no reason to buffer it there on a step that does not refresh.
      """
      moment_ids = [s for s, (j, _) in slots.items() if j in members]
      ops = ({i: matrices[i] for i in members}, {i: bases[i] for i in members},
             {s: state_leaves[s] for s in moment_ids}, key, warm, *extra)
      new_bases, new_moments, *rest = jax.lax.cond(pred, branch, lambda ops: (ops[1], ops[2], *ops[5:]), ops)
      for i in members:
        bases[i] = new_bases[i]
      for s in moment_ids:
        state_leaves[s] = new_moments[s]
      return rest

    schedule = state.schedule
    targeted = [i for i, p in enumerate(plans) if p]
    if adaptive_gap is None:
      due_at = {o: _due(state.count, o, update_proj_gap) for o in set(offsets) if o is not None}
      if batch_refresh:  # one cond per offset; inside it, one batched call per shape
        for offset in sorted(due_at):
          members = [i for i in targeted if offsets[i] == offset]
          refresh_under_cond(due_at[offset], members,
                             lambda ops, members=members: batched_refresh(ops, members, plans, slots))
      else:  # one cond per shape; inside it, one loop over the members that are due
        for group in _refresh_groups(plans, bases, targeted, same_batch_shape=True).values():
          group_offsets = sorted({offsets[i] for i in group})
          due = {i: True if len(group_offsets) == 1 else due_at[offsets[i]] for i in group}
          any_due = functools.reduce(jnp.logical_or, [due_at[o] for o in group_offsets])
          refresh_under_cond(any_due, group,
                             lambda ops, group=group, due=due: looped_refresh(ops, group, due, plans, slots))
    else:
      schedule = dict(schedule)
      for group in _refresh_groups(plans, bases, targeted, same_batch_shape=True).values():
        entries = [schedule[plans[i].path] for i in group]
        due = {i: state.count >= entry[1] for i, entry in zip(group, entries)}
        (entries,) = refresh_under_cond(
            functools.reduce(jnp.logical_or, list(due.values())), group,
            lambda ops, group=group, due=due: adaptive_refresh(ops, group, due, state.count, plans, slots), entries)
        schedule.update({plans[i].path: entry for i, entry in zip(group, entries)})
    inner_state = state_def.unflatten(state_leaves)
    low = [projection.project(g, b) if p else g for p, g, b in zip(plans, matrices, bases)]
    low_updates, inner_state = inner.update(treedef.unflatten(low), inner_state, None, **extra_args)

    def back(p, u, b, g):
      if p is None:
        return u
      full = projection.project_back(u, b)
      return p.from_matrix((scale * full.astype(jnp.float32)).astype(g.dtype))

    out = [back(p, u, b, g) for p, u, b, g in zip(plans, treedef.flatten_up_to(low_updates), bases, grads)]
    return treedef.unflatten(out), GaLoreState(
        count=optax.safe_increment(state.count),
        bases={p.path: b for p, b in zip(plans, bases) if p},
        inner_state=inner_state,
        schedule=schedule,
    )

  def adaptive_refresh(ops, group, due, count, plans, slots):
    """The group's due leaves refreshed (:func:`looped_refresh`), and their ``[gap, next step]`` entries advanced."""
    *ops, entries = ops
    bases = ops[1]
    new_bases, moments = looped_refresh(tuple(ops), group, due, plans, slots)
    offsets = refresh_offsets(plans, update_proj_gap, stagger)
    new_entries = []
    for i, entry in zip(group, entries):
      p = plans[i]
      chance = [p.rank / d for d, side in ((p.m, p.sides.input), (p.n, p.sides.output)) if side]
      chance = sum(chance) / len(chance)
      overlap = projection.subspace_overlap(new_bases[i], bases[i])
      normalized = (overlap - chance) / (1 - chance) if chance < 1 else jnp.float32(1)
      gap = entry[0]
      grown = jnp.where(normalized >= adaptive_gap.threshold,
                        jnp.minimum(gap * adaptive_gap.factor, max_gap), update_proj_gap).astype(jnp.int32)
      first = count == 0
      new_gap = jnp.where(first, gap, grown)
      next_step = jnp.where(first, offsets[i] if offsets[i] > 0 else update_proj_gap, count + new_gap)
      new_entries.append(jnp.where(due[i], jnp.stack([new_gap, next_step]).astype(jnp.int32), entry))
    return new_bases, moments, new_entries

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Callable[[str, tuple[int, ...]], int] = 128,
    update_proj_gap: int = 200,
    scale: float | jax.Array = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    target: Any = None,
    dimension_numbers: Any = None,
    on_refresh: str = "keep",
    basis_dtype: jax.typing.DTypeLike = "float32",
    moment_dtype: jax.typing.DTypeLike | None = None,
    refresh: str | RefreshFn = "svd",
    refresh_seed: int = 0,
    stagger: bool = False,
    batch_refresh: bool = False,
    adaptive_gap: AdaptiveGap | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""galore-torch's ``GaLoreAdamW`` as an optax optimizer.

  ``chain(galore(scale_by_adam_hf(b1, b2, eps)), scale_by_learning_rate(learning_rate),
  decay_updated_weights(learning_rate, weight_decay))``: Adam in the subspace with
  the reference's epsilon placement (:func:`galore_jax.scale_by_adam_hf`), plain
  AdamW for non-targeted leaves, and decoupled weight decay on every parameter
  (or ``weight_decay_mask``) applied, as in the reference, to the already
  updated weight: :math:`W \leftarrow (W - \eta U)(1 - \eta\lambda)`.

  Args:
    learning_rate: a float or an optax schedule.
    rank, update_proj_gap, scale, proj_type, target, dimension_numbers,
      on_refresh, basis_dtype, refresh, refresh_seed, stagger, batch_refresh,
      adaptive_gap: as in :func:`galore`.
    b1, b2, eps: Adam's constants; ``eps`` defaults to the reference's 1e-6.
    weight_decay: decoupled weight decay :math:`\lambda`.
    weight_decay_mask: a tree of bools or callable, as in :func:`optax.adamw`.
    moment_dtype: storage dtype of Adam's moments (``None``: the low-rank
      gradient's dtype).

  Example:
    >>> import optax
    >>> from galore_jax import galore_adamw
    >>> tx = galore_adamw(optax.cosine_decay_schedule(0.01, 1000), rank=128)
  """
  parts = [
      galore(
          scale_by_adam_hf(b1, b2, eps, moment_dtype=moment_dtype),
          rank=rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          target=target,
          dimension_numbers=dimension_numbers,
          on_refresh=on_refresh,
          basis_dtype=basis_dtype,
          refresh=refresh,
          refresh_seed=refresh_seed,
          stagger=stagger,
          batch_refresh=batch_refresh,
          adaptive_gap=adaptive_gap,
      ),
  ]
  parts.append(optax.scale_by_learning_rate(learning_rate))
  if not (isinstance(weight_decay, numbers.Number) and weight_decay == 0):
    decay = decay_updated_weights(learning_rate, weight_decay)
    parts.append(decay if weight_decay_mask is None else optax.masked(decay, weight_decay_mask))
  return optax.chain(*parts)
