"""GaLore as an optax gradient transformation: :func:`galore` and its state.

``galore(inner)`` projects the gradient of every targeted weight matrix onto a
rank-``r`` subspace, runs ``inner`` (Adam by default) on the projected tree and
projects the result back. Everything else goes through ``inner`` at full rank.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim import executors, guard, moments
from galore_jax.optim import refresh as refresh_lib
from galore_jax.optim import schedule as schedule_lib
from galore_jax.optim.basis import (
  identity_basis,
  is_quantized,
  keep_codes_unless_refreshed,
  load_basis,
  project,
  quantization_problem,
  store_basis,
  subspace_overlap,
)
from galore_jax.optim.executors import Fresh, Refresher, RefreshOps
from galore_jax.optim.options import GaLoreOptions, takes_galore_options
from galore_jax.optim.plan import TreePlan, plan_leaves, warn_if_nothing_targeted
from galore_jax.optim.rules import ProjectBack, UpdateRule


class GaLoreState(NamedTuple):
  """State of :func:`galore`.

  Attributes:
    count: completed steps (int32); a step refreshes the bases when
      ``count % update_proj_gap == 0`` (with ``stagger``, per leaf, see
      :func:`~galore_jax.refresh_offsets`).
    bases: ``{path: Basis}`` for the targeted leaves only, keyed by the
      ``'/'``-joined key path (no placeholders for other leaves, so orbax can
      save it; a plain dict, so parameter containers such as NNX variables do
      not wrap it).
    inner_state: the state of the inner transformation, whose targeted leaves
      have their low-rank shapes.
    schedule: ``None``, or with ``adaptive_gap`` ``{path: int32[2]}`` holding
      each targeted leaf's current gap and the step of its next refresh.
    rule_state: ``None``, or ``{path: state}`` of an update rule that keeps one
      (e.g. a norm-growth limiter's previous norm).
  """

  count: jax.Array
  bases: Any
  inner_state: optax.OptState
  schedule: Any = None
  rule_state: Any = None


class _NotParams:
  """A leaf standing for state that is not shaped like the parameters (for optax.tree_map_params)."""


def _is_params_placeholder(params) -> bool:
  """optax.tree_map_params calls init on one opaque object: a pytree node without children."""
  if params is None or isinstance(params, (dict, list, tuple)) or hasattr(params, "shape"):
    return False
  return jax.tree.structure(params).num_leaves == 0


def plan_tree(tree, options: GaLoreOptions) -> TreePlan:
  return plan_leaves(tree, target=options.target, rank=options.rank, dimension_numbers=options.dimension_numbers,
                     proj_type=options.proj_type)


class RefreshJob(NamedTuple):
  """One ``lax.cond`` of a step: its members (leaf indices), its predicate, and how it refreshes them."""

  members: list[int]
  predicate: jax.Array
  execute: Callable[[RefreshOps], Fresh]


def refresh_jobs(count, plans, bases, schedule, options: GaLoreOptions, r: Refresher) -> list[RefreshJob]:
  """The conditionals of a step: per shape group (a loop over its members), or per offset (``batch_refresh``)."""
  targeted = [i for i, p in enumerate(plans) if p]
  groups = schedule_lib.refresh_groups(plans, bases, targeted, same_batch_shape=True).values()
  if options.adaptive_gap is not None:
    jobs = []
    for group in groups:
      due = {i: count >= schedule[plans[i].path][1] for i in group}
      execute = functools.partial(executors.looped_refresh, group=group, due=due, r=r)
      jobs.append(RefreshJob(group, functools.reduce(jnp.logical_or, list(due.values())), execute))
    return jobs
  offsets = schedule_lib.refresh_offsets(plans, options.update_proj_gap, options.stagger)
  due_at = {o: schedule_lib.is_due(count, o, options.update_proj_gap) for o in set(offsets) if o is not None}
  if options.batch_refresh:
    by_offset = [[i for i in targeted if offsets[i] == o] for o in sorted(due_at)]
    return [RefreshJob(members, due_at[offsets[members[0]]],
                       functools.partial(executors.batched_refresh, members=members, r=r)) for members in by_offset]
  jobs = []
  for group in groups:
    group_offsets = sorted({offsets[i] for i in group})
    due = {i: True if len(group_offsets) == 1 else due_at[offsets[i]] for i in group}
    predicate = functools.reduce(jnp.logical_or, [due_at[o] for o in group_offsets])
    jobs.append(RefreshJob(group, predicate, functools.partial(executors.looped_refresh, group=group, due=due, r=r)))
  return jobs


class RefreshOut(NamedTuple):
  """What a refresh conditional returns: its members' bases, moments and schedule entries."""

  bases: dict
  moments: dict
  schedule: dict | None


def _unchanged(ops: RefreshOps) -> RefreshOut:
  return RefreshOut(ops.bases, ops.moments, ops.schedule)


def _refresh_branch(ops: RefreshOps, job: RefreshJob, count, slots, options: GaLoreOptions, r: Refresher) -> RefreshOut:
  """The taken branch: new bases, then the moments carried once, then (adaptive gap) the schedule moved on."""
  fresh = job.execute(ops)
  carried = moments.carry_moments(ops.moments, slots, r.plans, ops.bases, fresh.bases, fresh.changed,
                                  options.on_refresh, fresh.gates)
  schedule = ops.schedule
  if schedule is not None:
    offsets = schedule_lib.refresh_offsets(r.plans, options.update_proj_gap, options.stagger)
    schedule = {i: jnp.where(fresh.gates[i], options.adaptive_gap.advance(
        entry, subspace_overlap(fresh.bases[i], ops.bases[i]), r.plans[i], count, offsets[i], options.update_proj_gap),
                             entry) for i, entry in schedule.items()}
  return RefreshOut(fresh.bases, carried, schedule)


def refresh_due(state: GaLoreState, plan: TreePlan, matrices: list, bases: list, inner_leaves: list, slots: dict,
                options: GaLoreOptions, r: Refresher, finite: jax.Array | None = None) -> tuple[list, list, Any]:
  """Run the step's refresh conditionals; the bases, inner-state leaves and schedule after them.

  With ``finite`` (a traced bool) nothing refreshes on a step where it is False, so the bases, the
  schedule and the moments leave the conditionals unchanged (:mod:`~galore_jax.optim.guard`).

  Each conditional's operands are its members' gradients, bases, moments (and schedule entries)
  only: the rest of the optimizer state never flows through it, so XLA has no reason to buffer it
  there on a step that does not refresh.
  """
  count, plans = state.count, plan.leaves
  key = jax.random.fold_in(jax.random.key(options.refresh_seed), count) if "key" in r.keywords else None
  schedule = None if state.schedule is None else dict(state.schedule)
  bases, inner_leaves = list(bases), list(inner_leaves)
  for job in refresh_jobs(count, plans, bases, schedule, options, r):
    moment_ids = [s for s, slot in slots.items() if slot.leaf in job.members]
    ops = RefreshOps({i: matrices[i] for i in job.members}, {i: bases[i] for i in job.members},
                     {s: inner_leaves[s] for s in moment_ids}, key, count > 0,
                     None if schedule is None else {i: schedule[plans[i].path] for i in job.members},
                     count if "step" in r.keywords else None)
    branch = functools.partial(_refresh_branch, job=job, count=count, slots=slots, options=options, r=r)
    predicate = job.predicate if finite is None else job.predicate & finite
    out = jax.lax.cond(predicate, branch, _unchanged, ops)
    for i in job.members:
      bases[i] = out.bases[i]
      if schedule is not None:
        schedule[plans[i].path] = out.schedule[i]
    for s in moment_ids:
      inner_leaves[s] = out.moments[s]
  return bases, inner_leaves, schedule


def _rule_states(rule: UpdateRule, plan: TreePlan) -> dict | None:
  """``{path: rule.init(plan)}``, kept only for a stateful rule: ``init`` also checks that the rule can handle the
  leaf."""
  states = {p.path: rule.init(p) for p in plan.leaves if p}
  return states if rule.stateful else None


def _check_quantizable(plan: TreePlan, group_size: int) -> None:
  """``basis_dtype="int4"``: every basis splits into groups of ``group_size`` (a ValueError names the leaf)."""
  for p in plan.leaves:
    if not p:
      continue
    for d, side in ((p.m, p.sides.input), (p.n, p.sides.output)):
      problem = quantization_problem(d, p.rank, group_size) if side else None
      if problem:
        raise ValueError(f"basis_dtype='int4' at {p.path!r}: {problem}")


def _updates_back(rule: UpdateRule, plan: TreePlan, grads, matrices, bases, low, low_updates, rule_state, count, scale):
  """Each leaf's full-rank update (targeted leaves through ``rule``) and the rule's new state."""
  out, new_state = [], {} if rule_state is not None else None
  for p, g, mat, b, r, n in zip(plan.leaves, grads, matrices, bases, low, low_updates):
    if p is None:
      out.append(n)
      continue
    update, leaf_state = rule(p, mat, b, r, n, None if rule_state is None else rule_state[p.path], count, scale)
    out.append(p.from_matrix(update.astype(g.dtype)))
    if new_state is not None:
      new_state[p.path] = leaf_state
  return out, new_state


@takes_galore_options
def galore(inner: optax.GradientTransformation | None = None, *, update_rule: UpdateRule | None = None,
           **options) -> guard.FiniteAware:
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

  A step runs one ``lax.cond`` per group of leaves with equal shapes, around a
  ``fori_loop`` over the group (one copy of the refresh per distinct shape in the
  program, so the compile time of a deep model stays near AdamW's); with a
  two-stage refresh and no ``stagger`` the loop only sketches and the group's
  small factorisations are solved in one batched call. A refresh on a
  non-finite gradient keeps the previous basis of that matrix (batch element by
  batch element) instead of failing in the SVD; the bases start as leading unit
  vectors, so they are always orthonormal. Called with ``finite=False`` (a traced
  bool: the train step's verdict on the loss and gradient) it keeps its whole state,
  refreshing nothing, and passes ``finite`` to an inner transformation that honours it
  (:mod:`~galore_jax.optim.guard`: then no moment is copied to keep it); else wrap the
  chain in :func:`optax.apply_if_finite` to protect the moments.

  Args:
    inner: the transformation run in the subspace; default
      :func:`optax.scale_by_adam`. It receives no ``params`` (their shapes differ
      from the low-rank updates): put weight decay after ``galore`` in the chain.
    update_rule: how a targeted leaf's full-rank update is formed from the
      gradient, the basis and the inner update (:mod:`galore_jax.optim.rules`);
      default :class:`~galore_jax.optim.rules.ProjectBack`, GaLore's
      :math:`\alpha Q\,\mathrm{inner}(R)`.
    **options: the fields of :class:`~galore_jax.GaLoreOptions`: ``rank`` (128),
      ``update_proj_gap`` (200), ``scale`` (0.25), ``proj_type`` ("std"),
      ``target``, ``dimension_numbers``, ``on_refresh`` ("keep"), ``basis_dtype``, ``basis_group_size``,
      ``refresh`` ("svd"), ``refresh_seed``, ``stagger``, ``batch_refresh``,
      ``adaptive_gap``. Invalid values raise at construction.

  Returns:
    A :class:`~galore_jax.optim.guard.FiniteAware` transformation with :class:`GaLoreState`.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from galore_jax import galore
    >>> tx = optax.chain(galore(rank=2, update_proj_gap=10), optax.scale(-1e-2))
    >>> params = {'mlp': {'kernel': jnp.ones((4, 3))}, 'norm': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> state[0].bases['mlp/kernel'].output.shape  # kernel (in 4, out 3): the smaller, output side
    (3, 2)

  References:
    Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection*, ICML 2024 (arXiv:2403.03507).
  """
  options = GaLoreOptions(**options)
  refresh = refresh_lib.resolve(options.refresh)
  r_static = lambda plan: Refresher(refresh, refresh_lib.accepted_keywords(refresh), plan.leaves)
  quantized = is_quantized(options.basis_dtype)
  # int4 bases are stored as QuantizedBasis and computed with in fp32
  basis_dtype = jnp.dtype(jnp.float32 if quantized else options.basis_dtype)
  group_size = options.basis_group_size
  inner = optax.with_extra_args_support(inner if inner is not None else optax.scale_by_adam())
  rule = update_rule if update_rule is not None else ProjectBack()
  adaptive = options.adaptive_gap

  def init_fn(params):
    if _is_params_placeholder(params):
      # optax.tree_map_params probes init with a placeholder: no leaf of this state is parameter-shaped.
      return GaLoreState(count=jnp.zeros([], jnp.int32), bases=_NotParams(), inner_state=_NotParams(),
                         schedule=None if adaptive is None else _NotParams(),
                         rule_state=_NotParams() if rule.stateful else None)
    plan = plan_tree(params, options)
    warn_if_nothing_targeted(plan, params, options.target)
    leaves = plan.treedef.flatten_up_to(params)
    bases = {p.path: identity_basis(p.matrix_shape, p.rank, p.sides, basis_dtype) for p in plan.leaves if p}
    if quantized:
      _check_quantizable(plan, group_size)
      bases = {path: store_basis(b, group_size) for path, b in bases.items()}
    low = [jnp.zeros(p.low_rank_shape, jnp.result_type(x.dtype, basis_dtype)) if p else x
           for p, x in zip(plan.leaves, leaves)]
    schedule = None if adaptive is None else {
        p.path: adaptive.initial_entry(options.update_proj_gap) for p in plan.leaves if p}
    return GaLoreState(count=jnp.zeros([], jnp.int32), bases=bases, inner_state=inner.init(plan.treedef.unflatten(low)),
                       schedule=schedule, rule_state=_rule_states(rule, plan))

  def update_fn(updates, state, params=None, *, finite=None, **extra_args):
    del params
    plan = plan_tree(updates, options)
    grads = plan.treedef.flatten_up_to(updates)
    matrices = [p.to_matrix(g) if p else g for p, g in zip(plan.leaves, grads)]
    stored = [state.bases[p.path] if p else None for p in plan.leaves]
    loaded = [load_basis(b) if p else None for p, b in zip(plan.leaves, stored)]
    inner_leaves, inner_def = moments.flatten_inner(state.inner_state)
    slots = {} if options.on_refresh == "keep" else moments.moment_slots(state.inner_state, plan.keypaths, plan.leaves)
    bases, inner_leaves, schedule = refresh_due(state, plan, matrices, loaded, inner_leaves, slots, options,
                                                r_static(plan), finite)
    if quantized:  # store the refreshed bases as codes and compute with what the codes hold, as the reference
      stored = [keep_codes_unless_refreshed(b, old, s, group_size) if p else None
                for p, b, old, s in zip(plan.leaves, bases, loaded, stored)]
      bases = [load_basis(s) if p else None for p, s in zip(plan.leaves, stored)]
    else:
      stored = bases
    low = [project(g, b) if p else g for p, g, b in zip(plan.leaves, matrices, bases)]
    low_updates, inner_state = guard.update(inner, plan.treedef.unflatten(low), inner_def.unflatten(inner_leaves),
                                            None, finite=finite, **extra_args)
    out, rule_state = _updates_back(rule, plan, grads, matrices, bases, low, plan.treedef.flatten_up_to(low_updates),
                                    state.rule_state, state.count, options.scale)
    return plan.treedef.unflatten(out), GaLoreState(
        count=guard.keep_unless(finite, optax.safe_increment(state.count), state.count),
        bases={p.path: b for p, b in zip(plan.leaves, stored) if p},
        inner_state=inner_state,
        schedule=schedule,
        rule_state=guard.keep_unless(finite, rule_state, state.rule_state),
    )

  return guard.FiniteAware(init_fn, update_fn)
