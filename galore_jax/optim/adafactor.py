"""Adafactor as galore-torch's ``GaLoreAdafactor`` (a copy of HF transformers' ``Adafactor``) computes it.

Design. HF's step for a parameter ``p`` with (projected) gradient ``G``, step ``t`` (1-based):

1. ``β₂ₜ = 1 - t^decay_rate``; second moment of ``G² + eps[0]``: factored (row and column
   means over the last two axes) when ``G`` has ≥ 2 dims, else full;
   ``U = G / sqrt(V̂)``; ``U /= max(RMS(U) / clip_threshold, 1)``.
2. ``lr_t = max(eps[1], RMS(p)) · ρ_t`` (``scale_parameter``; else ``ρ_t``), with ``ρ_t`` =
   ``min(1e-2, 1/sqrt(t))`` (``relative_step``; ``min(1e-6·t, 1/sqrt(t))`` with
   ``warmup_init``) or the given ``lr``. ``U *= lr_t``.
3. Optional first moment ``M = β₁ M + (1-β₁) U``, ``U = M`` — of the *lr-scaled* update.
4. GaLore: ``U`` is projected back (times ``scale``); ``p -= wd·lr_t·p``; ``p -= U``.

Step 2 needs the RMS of the **full** parameter, which ``galore``'s inner transformation never sees
(it gets the low-rank gradient and ``params=None``), and step 3 puts ``lr_t`` inside the moving
average, so the learning rate cannot simply be applied after ``galore``. Hence the split:

* :func:`scale_by_adafactor_hf` — steps 1 and 3, in whatever space it runs (inside
  :func:`galore_jax.galore`: the subspace, so the projected gradient's shape decides factoring, as in
  the reference). It accepts an extra argument ``leaf_scale`` (a tree of per-leaf scalars shaped like
  the updates' tree, default 1) multiplied in between, i.e. step 2's ``lr_t``. ``galore`` forwards
  extra arguments to its inner transformation.
* :func:`galore_jax.galore_adafactor` (in ``alias.py``) — an outer transformation that computes
  ``lr_t`` per leaf from the full ``params`` and its step count, calls
  ``galore(scale_by_adafactor_hf(...))`` with ``leaf_scale=lr_t``, and then applies step 4's sign and
  weight decay. Its output is the additive update (use with :func:`optax.apply_updates`; no separate
  learning-rate transformation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim import guard


class ScaleByAdafactorHFState(NamedTuple):
  """State of :func:`scale_by_adafactor_hf`.

  Attributes:
    count: completed steps (int32).
    v_row: per leaf, the row statistics ``[..., rows]`` of a factored second moment (leaves with
      ≥ 2 dims), else :class:`optax.MaskedNode`.
    v_col: per leaf, the column statistics ``[..., cols]``, else :class:`optax.MaskedNode`.
    v: per leaf, the full second moment of a 0/1-dim leaf, else :class:`optax.MaskedNode`.
    m: per leaf, the first moment when ``beta1`` is set, else :class:`optax.MaskedNode`.
  """

  count: jax.Array
  v_row: Any
  v_col: Any
  v: Any
  m: Any


def rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_adafactor_hf(
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    clip_threshold: float = 1.0,
    beta1: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HF/galore-torch Adafactor's normalized update (no learning rate, no parameter scale).

  .. math::
    \hat\beta_{2,t} = 1 - t^{\text{decay\_rate}},\quad
    R = \hat\beta R + (1-\hat\beta)\,\mathrm{mean}_{-1}(G^2+\epsilon),\quad
    C = \hat\beta C + (1-\hat\beta)\,\mathrm{mean}_{-2}(G^2+\epsilon),

    U = G \cdot \mathrm{rsqrt}(R/\bar R)\,\mathrm{rsqrt}(C),\quad
    U \leftarrow U / \max(\mathrm{RMS}(U)/\text{clip\_threshold}, 1),\quad
    U \leftarrow s\,U,\quad [M = \beta_1 M + (1-\beta_1) U,\ U = M]

  for leaves with ≥ 2 dims (factored over the last two axes, leading axes batched, as HF does);
  0/1-dim leaves keep a full second moment. ``s`` is the extra argument ``leaf_scale`` (a tree of
  scalars like the updates, default 1): pass the per-leaf learning rate there to reproduce HF's
  first moment of the *lr-scaled* update (see :func:`galore_adafactor`). Arithmetic is fp32; the
  state is fp32; the output has the update's dtype.

  Under :func:`galore_jax.galore` with ``on_refresh='project'|'reset'``, only the first moment ``m``
  (shaped like the low-rank update) is carried or reset; the factored statistics are kept.

  It is :class:`~galore_jax.optim.guard.FiniteAware`: called with ``finite=False`` (a traced bool) it
  keeps its state, selecting each statistic before the update reads it (the update then reads the stored
  state, so the old one is dead once the new one is written, and XLA copies nothing).
  """

  def init_fn(params):
    def row(p):
      return jnp.zeros(jnp.shape(p)[:-1], jnp.float32) if jnp.ndim(p) >= 2 else optax.MaskedNode()

    def col(p):
      s = jnp.shape(p)
      return jnp.zeros(s[:-2] + s[-1:], jnp.float32) if jnp.ndim(p) >= 2 else optax.MaskedNode()

    def full(p):
      return jnp.zeros(jnp.shape(p), jnp.float32) if jnp.ndim(p) < 2 else optax.MaskedNode()

    def first(p):
      return jnp.zeros(jnp.shape(p), jnp.float32) if beta1 is not None else optax.MaskedNode()

    return ScaleByAdafactorHFState(
        count=jnp.zeros([], jnp.int32),
        v_row=jax.tree.map(row, params),
        v_col=jax.tree.map(col, params),
        v=jax.tree.map(full, params),
        m=jax.tree.map(first, params),
    )

  def update_fn(updates, state, params=None, *, leaf_scale=None, finite=None, **extra_args):
    del params, extra_args
    count = guard.keep_unless(finite, optax.safe_increment(state.count), state.count)
    beta2t = 1.0 - jnp.power(count.astype(jnp.float32), decay_rate)
    flat_g, treedef = jax.tree.flatten(updates)
    scales = [None] * len(flat_g) if leaf_scale is None else treedef.flatten_up_to(leaf_scale)

    def leaf(g, row, col, v, m, s):
      g32 = jnp.asarray(g, jnp.float32)
      sq = g32 * g32 + eps
      if jnp.ndim(g32) >= 2:
        row, col = guard.kept_state(finite, (row * beta2t + (1.0 - beta2t) * jnp.mean(sq, axis=-1),
                                             col * beta2t + (1.0 - beta2t) * jnp.mean(sq, axis=-2)), (row, col))
        r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., None]
        c_factor = jax.lax.rsqrt(col)[..., None, :]
        u = r_factor * c_factor * g32
      else:
        v = guard.kept_state(finite, v * beta2t + (1.0 - beta2t) * sq, v)
        u = jax.lax.rsqrt(v) * g32
      u = u / jnp.maximum(rms(u) / clip_threshold, 1.0)
      if s is not None:
        u = u * jnp.asarray(s, jnp.float32)
      if beta1 is not None:
        m = guard.kept_state(finite, m * beta1 + (1.0 - beta1) * u, m)
        u = m
      return u.astype(jnp.asarray(g).dtype), row, col, v, m

    columns = [treedef.flatten_up_to(x) for x in (state.v_row, state.v_col, state.v, state.m)]
    out = [leaf(g, *rest) for g, *rest in zip(flat_g, *columns, scales)]
    if not out:
      return updates, state._replace(count=count)
    u, row, col, v, m = (treedef.unflatten(list(c)) for c in zip(*out))
    return u, ScaleByAdafactorHFState(count=count, v_row=row, v_col=col, v=v, m=m)

  return guard.FiniteAware(init_fn, update_fn)
