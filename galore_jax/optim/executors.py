"""How the refreshes that are due run inside one ``lax.cond``: batched, looped, or sketched then finished.

Each executor takes the conditional's operands (:class:`RefreshOps`, holding only its members'
entries) and returns the members' new bases and, per matrix, whether each basis was replaced
(:class:`Fresh`). A refresh on a non-finite gradient keeps the previous basis of that matrix.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from galore_jax.optim import linalg
from galore_jax.optim.basis import Basis
from galore_jax.optim.plan import LeafPlan
from galore_jax.optim.refresh import BATCH_BUDGET_BYTES, RefreshFn, is_two_stage
from galore_jax.optim.schedule import refresh_groups


class RefreshOps(NamedTuple):
  """Operands of one refresh conditional, keyed by leaf index (moments by inner-state leaf index)."""

  grads: dict[int, jax.Array]  # the members' gradients as matrices [..., m, n], in their own dtype
  bases: dict[int, Basis]
  moments: dict[int, Any]
  key: jax.Array | None  # this step's refresh key (None when the refresh takes none)
  warm: jax.Array  # False on step 0, when the previous bases are placeholders
  schedule: dict[int, jax.Array] | None = None  # adaptive gap: the members' [gap, next step]
  step: jax.Array | None = None  # the step count, for a refresh that takes ``step`` (None otherwise)


class Fresh(NamedTuple):
  """What an executor returns: the new bases, per matrix whether each was replaced, and (staggered
  members only) each member's traced due flag, so that work for members not due can be skipped."""

  bases: dict[int, Basis]
  changed: dict[int, jax.Array]
  gates: dict[int, Any] | None = None


class Refresher(NamedTuple):
  """The static half of a refresh: the callable, the keywords it takes, the tree's leaf plans."""

  refresh: RefreshFn
  keywords: frozenset[str]
  plans: Sequence[LeafPlan | None]

  def keys(self, key) -> list:
    """Per leaf, its matrices' PRNG keys (batch-shaped, or one key): matrix ``k`` of the tree gets ``split(key)[k]``.

    One split for the whole tree, so a matrix's draw depends on the step and its
    place in the tree only, never on how the refreshes are grouped or staggered.
    """
    if "key" not in self.keywords:
      return [None] * len(self.plans)
    sizes = [0 if p is None else p.matrices for p in self.plans]
    every = jax.random.split(key, max(sum(sizes), 1))
    keys, start = [], 0
    for p, size in zip(self.plans, sizes):
      if p is not None:
        keys.append(every[start:start + size].reshape(p.batch_shape) if p.batch_shape else every[start])
      else:
        keys.append(None)
      start += size
    return keys

  def __call__(self, g32s, olds, keys, warm, rank, step=None):
    kwargs = {}
    if "step" in self.keywords:
      kwargs["step"] = step
    if "key" in self.keywords:
      kwargs["key"] = keys
    if "warm" in self.keywords:
      kwargs["warm"] = warm
    return self.refresh(linalg.replicated(g32s), Basis(*(None if q is None else linalg.replicated(q) for q in olds)),
                        rank, **kwargs)


def finite_fp32(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(fp32 copy of g with non-finite matrices zeroed, per-matrix finiteness [...])``."""
  finite = jnp.all(jnp.isfinite(g), axis=(-2, -1))
  return jnp.where(finite[..., None, None], g.astype(jnp.float32), 0.0), finite


def keep_unless_changed(new: Basis, old: Basis, changed: jax.Array) -> Basis:
  return Basis(*(None if q_old is None else jnp.where(changed[..., None, None], q_new.astype(q_old.dtype), q_old)
                 for q_new, q_old in zip(new, old)))


def finish_chunk(members: int, member_bytes: int, budget_bytes: int) -> int:
  """Members per batched finish of a two-stage refresh: the largest divisor of ``members`` whose sketches fit the
  budget (≥ 1)."""
  return max(d for d in range(1, members + 1) if members % d == 0 and (d == 1 or d * member_bytes <= budget_bytes))


def _stack_group(items: list) -> Any:
  """Concatenate per-leaf arrays (or Bases) along a flat leading batch axis."""
  flat = lambda x: None if x is None else x.reshape(-1, *x.shape[-2:])
  if isinstance(items[0], Basis):
    return Basis(*(None if items[0][s] is None else jnp.concatenate([flat(b[s]) for b in items]) for s in range(2)))
  return jnp.concatenate([flat(x) for x in items])


def batched_refresh(ops: RefreshOps, members: Sequence[int], r: Refresher) -> Fresh:
  """Refresh ``members``: one batched call per group of equal shapes (``batch_refresh``)."""
  plans = r.plans
  changed, g32 = {}, {}
  for i in members:
    g32[i], changed[i] = finite_fp32(ops.grads[i])
  keys = r.keys(ops.key)
  fresh = {}
  for group in refresh_groups(plans, ops.bases, members, same_batch_shape=False).values():
    rank = plans[group[0]].rank
    if len(group) == 1:
      (i,) = group
      fresh[i] = r(g32[i], ops.bases[i], keys[i], ops.warm, rank, ops.step)
      continue
    stacked_k = None if keys[group[0]] is None else jnp.concatenate([jnp.reshape(keys[i], (-1,)) for i in group])
    out = r(_stack_group([g32[i] for i in group]), _stack_group([ops.bases[i] for i in group]), stacked_k, ops.warm,
            rank, ops.step)
    start = 0
    for i in group:
      size = plans[i].matrices
      fresh[i] = Basis(*(None if q is None else q[start:start + size].reshape(*plans[i].batch_shape, *q.shape[-2:])
                         for q in out))
      start += size
  new_bases = {i: keep_unless_changed(fresh[i], ops.bases[i], changed[i]) for i in members}
  return Fresh(new_bases, changed)


def looped_refresh(ops: RefreshOps, group: Sequence[int], due: dict[int, Any], r: Refresher) -> Fresh:
  """Refresh the leaves of one shape group by a ``fori_loop`` over them: one copy of the refresh in the program.

  ``due`` holds each member's schedule predicate (``True``, or traced with stagger); a member
  that is not due is skipped and keeps its basis. The loop picks a member's gradient with
  ``lax.switch``, so only one fp32 gradient copy exists at a time.
  """
  grads, bases = ops.grads, ops.bases
  keys = r.keys(ops.key)
  rank = r.plans[group[0]].rank
  finite = {i: jnp.all(jnp.isfinite(grads[i]), axis=(-2, -1)) for i in group}
  always_due = all(isinstance(due[i], bool) for i in group)
  loaders = [lambda i=i: (finite_fp32(grads[i])[0], bases[i]) for i in group]
  stacked_keys = None if keys[group[0]] is None else jnp.stack([keys[i] for i in group])
  if len(group) == 1:
    (i,) = group
    fresh = {i: r(finite_fp32(grads[i])[0], bases[i], keys[i], ops.warm, rank, ops.step)}
  elif always_due and is_two_stage(r.refresh):
    fresh = dict(zip(group, sketched_refresh(loaders, stacked_keys, bases[group[0]], ops.warm, rank, r.refresh)))
  else:
    due_now = None if always_due else jnp.stack([jnp.asarray(due[i]) for i in group])

    def body(j, outs):
      g, old = jax.lax.switch(j, loaders)
      run = lambda: Basis(*(None if q is None else q.astype(o.dtype) for q, o in zip(
          r(g, old, None if stacked_keys is None else stacked_keys[j], ops.warm, rank, ops.step), old)))
      new = run() if always_due else jax.lax.cond(due_now[j], run, lambda: old)
      return Basis(*(None if o is None else o.at[j].set(q) for o, q in zip(outs, new)))

    outs = jax.lax.fori_loop(0, len(group), body, _group_buffer(bases[group[0]], len(group)))
    fresh = {i: Basis(*(None if o is None else o[j] for o in outs)) for j, i in enumerate(group)}
  changed = {i: finite[i] & due[i] for i in group}
  new_bases = {i: keep_unless_changed(fresh[i], bases[i], changed[i]) for i in group}
  return Fresh(new_bases, changed, None if always_due else due)


def _group_buffer(template: Basis, size: int) -> Basis:
  """Zeros for ``size`` bases shaped like ``template``, stacked on a new leading axis."""
  return Basis(*(None if q is None else jnp.zeros((size, *q.shape), q.dtype) for q in template))


def sketched_refresh(loaders: Sequence[Callable], stacked_keys, template: Basis, warm, rank: int,
                     refresh) -> list[Basis]:
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
    return refresh.sketch(linalg.replicated(g), old, rank, key=key, warm=warm), old

  shapes = jax.eval_shape(one_sketch, 0)
  per_member = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes[0]))
  chunk = finish_chunk(size, per_member, getattr(refresh, "batch_budget_bytes", BATCH_BUDGET_BYTES))

  def chunk_body(c, outs):
    def sketch_body(j, bufs):
      return jax.tree.map(lambda buf, x: buf.at[j].set(x), bufs, one_sketch(c * chunk + j))

    empty = jax.tree.map(lambda x: jnp.zeros((chunk, *x.shape), x.dtype), shapes)
    sketches, olds = jax.lax.fori_loop(0, chunk, sketch_body, empty)
    new = refresh.finish(jax.tree.map(linalg.replicated, sketches), olds, rank, warm=warm)
    return Basis(*(None if o is None else jax.lax.dynamic_update_slice_in_dim(o, q.astype(o.dtype), c * chunk, 0)
                   for o, q in zip(outs, new)))

  outs = jax.lax.fori_loop(0, size // chunk, chunk_body, _group_buffer(template, size))
  return [Basis(*(None if o is None else o[j] for o in outs)) for j in range(size)]
