"""Skipping a non-finite step inside the optimizer: the state kept, and no copy of it made.

A train step that skips non-finite steps keeps the old parameters and optimizer state when the loss or
the gradient is not finite. Selected after the update, ``where(finite, new_state, old_state)``, every
moment is read twice: by the update, which needs the new moments, and by the select, which overwrites the
old ones in place. The two reads are in separate fusions that XLA cannot order, so it keeps a copy of
every old moment: with fp32 moments, 1.2-7.2 GB at Llama-7B on a CPU compile (``bench.skip_nonfinite``).
A transformation that *honours* ``finite`` selects its moments itself, before its update reads them:
the update then reads the state it returns, and nothing is copied.

The contract: ``tx.update(updates, state, params, finite=finite)``, with ``finite`` a traced scalar bool,
returns ``state`` unchanged where ``finite`` is False; its updates are then meaningless, and the caller
keeps the old parameters. :func:`honours_finite` tells whether a transformation makes that promise,
:func:`update` calls any transformation under the contract (selecting the state after the update for one
that does not honour it), and :func:`chain` is :func:`optax.chain` honouring it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


class FiniteAware(optax.GradientTransformationExtraArgs):
  """A transformation whose ``update`` accepts ``finite=`` and keeps its state when ``finite`` is False (and, as
  every :class:`optax.GradientTransformationExtraArgs`, ignores the extra arguments it does not know)."""

  __slots__ = ()


def honours_finite(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx`` keeps its own state on ``finite=False`` (else :func:`update` selects it after the update)."""
  return isinstance(tx, FiniteAware)


def keep_unless(finite: jax.Array | None, new: Any, old: Any) -> Any:
  """``new``, or ``old`` where ``finite`` is False, leaf by leaf (``finite`` None: ``new``)."""
  if finite is None:
    return new
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def kept_state(finite: jax.Array | None, new: Any, old: Any) -> Any:
  """:func:`keep_unless` for state that the update then reads: materialised as selected, so that XLA does not
  fuse the select into the update's fusion, which would read ``old`` again after it is overwritten (a copy)."""
  if finite is None:
    return new
  return jax.lax.optimization_barrier(keep_unless(finite, new, old))


def update(tx: optax.GradientTransformation, updates, state, params=None, *, finite: jax.Array | None = None,
           **extra_args) -> tuple[Any, Any]:
  """``tx.update`` under the contract: the new state, or ``state`` where ``finite`` is False."""
  if finite is not None and honours_finite(tx):
    return tx.update(updates, state, params, finite=finite, **extra_args)
  updates, new_state = optax.with_extra_args_support(tx).update(updates, state, params, **extra_args)
  return updates, keep_unless(finite, new_state, state)


def chain(*transforms: optax.GradientTransformation) -> FiniteAware:
  """:func:`optax.chain` (the same state: a tuple of the members' states) that honours ``finite``.

  A member that honours it is passed ``finite``; any other has its new state selected after its update.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax.optim import guard, scale_by_adam_hf
    >>> tx = guard.chain(scale_by_adam_hf(), optax.scale_by_learning_rate(1e-3))
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> _, kept = tx.update({'w': jnp.full(3, jnp.nan)}, state, params, finite=jnp.bool_(False))
    >>> bool(jnp.all(kept[0].mu['w'] == 0)), int(kept[0].count)
    (True, 0)
  """

  def init_fn(params):
    return tuple(tx.init(params) for tx in transforms)

  def update_fn(updates, state, params=None, *, finite=None, **extra_args):
    new_state = []
    for tx, member_state in zip(transforms, state):
      updates, member_state = update(tx, updates, member_state, params, finite=finite, **extra_args)
      new_state.append(member_state)
    return updates, tuple(new_state)

  return FiniteAware(init_fn, update_fn)
