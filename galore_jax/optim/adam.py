"""Adam as galore-torch (and transformers' old ``AdamW``) computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim import guard


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    moment_dtype: jax.typing.DTypeLike | None = None,
    bias_correction: bool = True,
) -> guard.FiniteAware:
  r"""Adam with ``eps`` added to :math:`\sqrt{v}` *before* bias correction.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t} + \epsilon}

  This is ``GaLoreAdamW``'s step. :func:`optax.scale_by_adam` adds ``eps`` to
  :math:`\sqrt{\hat v_t}` instead, i.e. an effective ``eps·sqrt(1-β₂ᵗ)``; the two
  differ only where :math:`\sqrt{v}` is comparable to ``eps``.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to :math:`\sqrt{v_t}`; the reference's default is 1e-6.
    moment_dtype: storage dtype of both moments (``None``: the parameter's
      dtype). Arithmetic is always fp32; ``jnp.bfloat16`` reproduces the
      reference's pure-bf16 runs.
    bias_correction: multiply by the step size factor
      :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`. Off, the output is the
      *normalized* update :math:`m_t/(\sqrt{v_t}+\epsilon)` that Fira and APOLLO
      measure norms of; :func:`scale_by_bias_correction` then applies the factor
      to the whole update, as their references do.

  Returns:
    A :class:`~galore_jax.optim.guard.FiniteAware` transformation whose state is
    :class:`optax.ScaleByAdamState`, so optax's state utilities apply. Called with
    ``finite=False`` (a traced bool) it keeps its state, selecting each moment before
    the step reads it (:mod:`~galore_jax.optim.guard`).
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype or jnp.asarray(p).dtype)
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
    )

  def update_fn(updates, state, params=None, *, finite=None, **extra_args):
    del params, extra_args  # an optax extra-args transformation ignores those it does not know
    count = guard.keep_unless(finite, optax.safe_increment(state.count), state.count)
    step_scale = _step_size_factor(b1, b2, count) if bias_correction else 1.0

    def leaf(g, m_old, v_old):
      g32 = g.astype(jnp.float32)
      m = (b1 * m_old.astype(jnp.float32) + (1.0 - b1) * g32).astype(m_old.dtype)
      v = (b2 * v_old.astype(jnp.float32) + (1.0 - b2) * g32 * g32).astype(v_old.dtype)
      m, v = guard.kept_state(finite, (m, v), (m_old, v_old))
      # The step reads the stored moments (as the reference's in-place ones), not their fp32 values before
      # rounding, nor the moments before the skip's select: then the old moments are dead once the new ones
      # are written, and XLA needs no copy of them.
      u = step_scale * m.astype(jnp.float32) / (jnp.sqrt(v.astype(jnp.float32)) + eps)
      return u.astype(g.dtype), m, v

    flat_g, treedef = jax.tree.flatten(updates)
    flat = [leaf(g, m, v) for g, m, v in zip(flat_g, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu))]
    u, mu, nu = (treedef.unflatten(column) for column in zip(*flat)) if flat else (updates, state.mu, state.nu)
    return u, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return guard.FiniteAware(init_fn, update_fn)


def _step_size_factor(b1: float, b2: float, count: jax.Array) -> jax.Array:
  t = count.astype(jnp.float32)
  return jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)


def scale_by_bias_correction(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  r"""Multiply the update by HF AdamW's step size factor :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` (``t`` from 1).

  After ``scale_by_adam_hf(bias_correction=False)`` (possibly with a rule in between that
  rescales the normalized update) this is the reference's ``p.add_(update, alpha=-step_size)``.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    factor = _step_size_factor(b1, b2, count)
    updates = jax.tree.map(lambda u: (factor * u.astype(jnp.float32)).astype(u.dtype), updates)
    return updates, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def decay_updated_weights(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay applied to the *already updated* weight, as galore-torch does.

  Placed after the learning-rate scaling, it turns an update :math:`u` into
  :math:`u - \eta_t\lambda\,(W + u)`, so that :math:`W + u' = (W + u)(1 - \eta_t\lambda)`:
  the reference's ``p.add_(update); p.add_(p, alpha=-lr * wd)``. (:func:`optax.add_decayed_weights`
  before the learning rate decays the current weight instead, a difference of :math:`\eta^2\lambda u`.)
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decay_updated_weights needs params: call update(updates, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    factor = lr * weight_decay
    decayed = jax.tree.map(lambda u, p: (u - factor * (p + u)).astype(u.dtype), updates, params)
    return decayed, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
