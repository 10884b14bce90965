"""Ready optimizers with a learning rate: galore-torch's ``GaLoreAdamW``, ``GaLoreAdamW8bit``, ``GaLoreAdafactor``,
and the follow-ups on the same core: ``FiraAdamW`` (:func:`fira_adamw`), APOLLO and APOLLO-Mini
(:func:`apollo_adamw`, :func:`apollo_mini`), GoLore (:func:`golore_adamw`) and Q-GaLore's projections
(:func:`q_galore_adamw`).

Each takes the :class:`~galore_jax.GaLoreOptions` fields as keyword arguments besides its own.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim import guard
from galore_jax.optim.adafactor import rms, scale_by_adafactor_hf
from galore_jax.optim.adam import decay_updated_weights, scale_by_adam_hf, scale_by_bias_correction
from galore_jax.optim.adam8bit import scale_by_adam_8bit
from galore_jax.optim.apollo import apollo
from galore_jax.optim.fira import fira
from galore_jax.optim.options import GaLoreOptions, takes_galore_options
from galore_jax.optim.plan import plan_leaves
from galore_jax.optim.refresh import GoLoreRefresh
from galore_jax.optim.schedule import AdaptiveGap
from galore_jax.optim.transform import galore


def _is_zero(x) -> bool:
  return isinstance(x, numbers.Number) and x == 0


def _forwards_to(base, **defaults):
  """Decorate ``fn(learning_rate, *, own..., **kwargs)`` that passes ``kwargs`` on to ``base``: its signature
  lists its own parameters, then ``base``'s keyword-only ones with ``defaults`` changed (for IDEs and
  :func:`optax.inject_hyperparams`), and calls get those defaults."""

  def decorate(fn):
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    inherited = [p.replace(default=defaults.get(p.name, p.default)) for p in inspect.signature(base).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in signature.parameters]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      return fn(*args, **{**defaults, **kwargs})

    wrapper.__signature__ = signature.replace(parameters=own + inherited)
    return wrapper

  return decorate


@takes_galore_options
def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    moment_dtype: jax.typing.DTypeLike | None = None,
    **options,
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
    b1, b2, eps: Adam's constants; ``eps`` defaults to the reference's 1e-6.
    weight_decay: decoupled weight decay :math:`\lambda`.
    weight_decay_mask: a tree of bools or callable, as in :func:`optax.adamw`.
    moment_dtype: storage dtype of Adam's moments (``None``: the low-rank
      gradient's dtype).
    **options: the :class:`~galore_jax.GaLoreOptions` fields, as in :func:`galore_jax.galore`.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from galore_jax import galore_adamw
    >>> tx = galore_adamw(optax.cosine_decay_schedule(0.01, 1000), rank=2)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['attn']['kernel'].shape
    (8, 4)
  """
  parts = [galore(scale_by_adam_hf(b1, b2, eps, moment_dtype=moment_dtype), **options),
           optax.scale_by_learning_rate(learning_rate)]
  if not _is_zero(weight_decay):
    decay = decay_updated_weights(learning_rate, weight_decay)
    parts.append(decay if weight_decay_mask is None else optax.masked(decay, weight_decay_mask))
  return guard.chain(*parts)


def _and_masks(a, b):
  """Combine two optax masks (trees of bools, callables or None) into a callable mask."""

  def resolve(mask, params):
    if mask is None:
      return jax.tree.map(lambda _: True, params)
    return mask(params) if callable(mask) else mask

  def mask(params):
    return jax.tree.map(lambda x, y: bool(x) and bool(y), resolve(a, params), resolve(b, params))

  return mask


@takes_galore_options
def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""galore-torch's ``GaLoreAdamW8bit`` as an optax optimizer.

  ``galore(scale_by_adam_8bit(b1, b2, eps, block_size=..., min_8bit_size=...))``
  then the learning rate. Weight decay follows the reference exactly: on
  GaLore (targeted) leaves it decays the *already updated* weight
  (:func:`galore_jax.decay_updated_weights`, the reference's
  ``p.add_(p, alpha=-lr*wd)`` after the projected step); on the other leaves
  bitsandbytes' kernel decays the weight *before* the step
  (``p *= 1 - lr·wd; p -= lr·u``), i.e. :func:`optax.add_decayed_weights` before
  the learning rate. ``weight_decay_mask`` restricts both.

  Defaults follow :func:`galore_jax.galore_adamw` except ``eps=1e-8`` (bnb's
  default; added after bias correction, see :func:`galore_jax.scale_by_adam_8bit`).
  The reference's default ``weight_decay`` is 1e-2; here it is 0.0 like
  ``galore_adamw``.

  Args:
    learning_rate: a float or an optax schedule.
    block_size, min_8bit_size: see :func:`galore_jax.scale_by_adam_8bit`.
    **options: the :class:`~galore_jax.GaLoreOptions` fields, as in :func:`galore_jax.galore`.
    Others: as in :func:`galore_adamw`.
  """
  gal = galore(scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size), **options)
  if _is_zero(weight_decay):
    return guard.chain(gal, optax.scale_by_learning_rate(learning_rate))
  opts = GaLoreOptions(**options)

  def targeted(params):
    plan = plan_leaves(params, target=opts.target, rank=opts.rank, dimension_numbers=opts.dimension_numbers,
                       proj_type=opts.proj_type)
    return plan.treedef.unflatten([p is not None for p in plan.leaves])

  def not_targeted(params):
    return jax.tree.map(lambda t: not t, targeted(params))

  return guard.chain(
      gal,
      optax.masked(optax.add_decayed_weights(weight_decay), _and_masks(not_targeted, weight_decay_mask)),
      optax.scale_by_learning_rate(learning_rate),
      optax.masked(decay_updated_weights(learning_rate, weight_decay), _and_masks(targeted, weight_decay_mask)),
  )


class GaLoreAdafactorState(NamedTuple):
  """State of :func:`galore_adafactor`: its step count and ``galore``'s state."""

  count: jax.Array
  galore_state: Any


def _relative_step_size(count, learning_rate, relative_step: bool, warmup_init: bool) -> jax.Array:
  """HF Adafactor's ``ρ_t`` for the 0-based step ``count``."""
  t = optax.safe_increment(count).astype(jnp.float32)
  if relative_step:
    min_step = 1e-6 * t if warmup_init else 1e-2
    return jnp.minimum(min_step, 1.0 / jnp.sqrt(t))
  return jnp.asarray(learning_rate(count) if callable(learning_rate) else learning_rate, jnp.float32)


@takes_galore_options
def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: bool | None = None,
    warmup_init: bool = False,
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""galore-torch's ``GaLoreAdafactor`` as an optax optimizer (the output is the full update).

  Per leaf and step ``t``: ``lr_t = max(eps[1], RMS(p)) · ρ_t`` (without ``scale_parameter``:
  ``ρ_t``), ``ρ_t = min(1e-2, 1/sqrt(t))`` with ``relative_step`` (``min(1e-6 t, 1/sqrt(t))`` with
  ``warmup_init``), else ``learning_rate`` (float or schedule of the 0-based step). Then
  ``u = galore(scale_by_adafactor_hf(...))`` with ``leaf_scale=lr_t`` (so the first moment, if any,
  averages lr-scaled updates, as HF does) and the returned update is ``-u - weight_decay·lr_t·p``
  (HF decays the weight before subtracting the update, which is the same sum). ``RMS(p)`` is of the
  full parameter, before the step; ``params`` are required when ``scale_parameter`` or
  ``weight_decay`` is on. Leaves not targeted get full-rank Adafactor, as the reference's plain
  param groups.

  Args:
    learning_rate: ``None`` (relative step, the reference's default) or a float / schedule; like
      HF, a learning rate together with ``relative_step=True`` is an error.
    eps: ``(eps added to G², floor of the parameter scale)``.
    clip_threshold, decay_rate, beta1: as in HF ``Adafactor``.
    weight_decay: HF's ``p -= weight_decay · lr_t · p``.
    scale_parameter, relative_step, warmup_init: as in HF; ``relative_step`` defaults to
      ``learning_rate is None``.
    **options: the :class:`~galore_jax.GaLoreOptions` fields, as in :func:`galore_jax.galore`.
  """
  if relative_step is None:
    relative_step = learning_rate is None
  if learning_rate is not None and relative_step:
    raise ValueError("Cannot combine manual `learning_rate` and `relative_step=True` options")
  if learning_rate is None and not relative_step:
    raise ValueError("learning_rate is required when relative_step=False")
  if warmup_init and not relative_step:
    raise ValueError("`warmup_init=True` requires `relative_step=True`")
  eps1, eps2 = eps
  gal = galore(scale_by_adafactor_hf(decay_rate=decay_rate, eps=eps1, clip_threshold=clip_threshold, beta1=beta1),
               **options)
  needs_params = scale_parameter or weight_decay != 0

  def init_fn(params):
    return GaLoreAdafactorState(count=jnp.zeros([], jnp.int32), galore_state=gal.init(params))

  def update_fn(updates, state, params=None, *, finite=None, **extra_args):
    if needs_params and params is None:
      raise ValueError("galore_adafactor needs params (scale_parameter / weight_decay): "
                       "call update(updates, state, params)")
    rho = _relative_step_size(state.count, learning_rate, relative_step, warmup_init)
    leaf_lr = lambda p: jnp.maximum(eps2, rms(jnp.asarray(p, jnp.float32))) * rho if scale_parameter else rho
    lrs = jax.tree.map(leaf_lr, params if params is not None else updates)
    u, gal_state = gal.update(updates, state.galore_state, params, finite=finite, leaf_scale=lrs, **extra_args)
    if weight_decay != 0:
      out = jax.tree.map(lambda x, p, lr: (-x.astype(jnp.float32) - weight_decay * lr * p).astype(x.dtype),
                         u, params, lrs)
    else:
      out = jax.tree.map(lambda x: -x, u)
    count = guard.keep_unless(finite, optax.safe_increment(state.count), state.count)
    return out, GaLoreAdafactorState(count=count, galore_state=gal_state)

  return guard.FiniteAware(init_fn, update_fn)


def _then_step_size(transform, learning_rate, b1, b2, weight_decay, weight_decay_mask):
  """``transform`` (an Adam-normalized update), then the reference's step size ``lr·√(1-β₂ᵗ)/(1-β₁ᵗ)``, then
  decoupled weight decay of the updated weight (``p.add_(p, alpha=-lr·wd)`` after the step, as Fira and APOLLO)."""
  parts = [transform, scale_by_bias_correction(b1, b2), optax.scale_by_learning_rate(learning_rate)]
  if not _is_zero(weight_decay):
    decay = decay_updated_weights(learning_rate, weight_decay)
    parts.append(decay if weight_decay_mask is None else optax.masked(decay, weight_decay_mask))
  return guard.chain(*parts)


@takes_galore_options
def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    moment_dtype: jax.typing.DTypeLike | None = None,
    norm_growth_limit: float | None = 1.01,
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""Fira's ``FiraAdamW`` as an optax optimizer: GaLore's low-rank Adam plus the scaled, limited residual.

  ``chain(fira(scale_by_adam_hf(b1, b2, eps, bias_correction=False)), scale_by_bias_correction(b1, b2),
  scale_by_learning_rate(learning_rate), decay_updated_weights(learning_rate, weight_decay))``: the update of
  a projected leaf is :math:`\alpha Q N + S` (:class:`~galore_jax.optim.fira.FiraRule`), times the
  reference's step size; other leaves get plain AdamW. Fira's scripts use the GaLore paper's settings
  (``scale`` = α 0.25, rank 128-512, ``update_proj_gap`` 200, lr 0.01), which are the defaults here but
  for the rank (128).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, weight_decay, weight_decay_mask, moment_dtype: as in :func:`galore_adamw`.
    norm_growth_limit: γ of the residual's norm-growth limiter (1.01); ``None`` turns it off.
    **options: the :class:`~galore_jax.GaLoreOptions` fields, as in :func:`galore_jax.galore`.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import fira_adamw
    >>> tx = fira_adamw(1e-2, rank=2)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['attn']['kernel'].shape
    (8, 4)

  References:
    Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?* (arXiv:2410.01623).
  """
  adam = scale_by_adam_hf(b1, b2, eps, moment_dtype=moment_dtype, bias_correction=False)
  return _then_step_size(fira(adam, norm_growth_limit=norm_growth_limit, **options), learning_rate, b1, b2,
                         weight_decay, weight_decay_mask)


@takes_galore_options(scale=1.0, refresh="random")
def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    moment_dtype: jax.typing.DTypeLike | None = None,
    scale_type: str = "channel",
    scale_front: bool = False,
    norm_growth_limit: float | None = 1.01,
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO's ``APOLLOAdamW`` as an optax optimizer: Adam's scaling of the raw gradient, estimated at low rank.

  ``chain(apollo(scale_by_adam_hf(b1, b2, eps, bias_correction=False), scale_type=...),
  scale_by_bias_correction(b1, b2), scale_by_learning_rate(learning_rate), decay_updated_weights(...))``:
  a projected leaf's update is :math:`\sqrt{s}\,\mathrm{limit}(G\phi)`
  (:class:`~galore_jax.optim.apollo.ApolloRule`) times the reference's step size; other leaves get plain
  AdamW. The reference's scripts: rank 1/4 of the hidden size (as GaLore; 256 for 130M-350M),
  ``scale`` 1, ``update_proj_gap`` 200, lr 0.01.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, weight_decay, weight_decay_mask, moment_dtype: as in :func:`galore_adamw`.
    scale_type, scale_front, norm_growth_limit: as in :func:`galore_jax.apollo`.
    **options: the :class:`~galore_jax.GaLoreOptions` fields, with APOLLO's defaults ``scale=1.0`` and
      ``refresh="random"`` (see :func:`galore_jax.apollo`).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import apollo_adamw
    >>> tx = apollo_adamw(1e-2, rank=2)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['attn']['kernel'].shape
    (8, 4)

  References:
    Zhu et al., *APOLLO: SGD-like Memory, AdamW-level Performance* (arXiv:2412.05270, MLSys 2025).
  """
  adam = scale_by_adam_hf(b1, b2, eps, moment_dtype=moment_dtype, bias_correction=False)
  transform = apollo(adam, scale_type=scale_type, scale_front=scale_front, norm_growth_limit=norm_growth_limit,
                     **options)
  return _then_step_size(transform, learning_rate, b1, b2, weight_decay, weight_decay_mask)


@_forwards_to(apollo_adamw, rank=1, scale=128.0, scale_type="tensor")
def apollo_mini(learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO-Mini: :func:`apollo_adamw` with rank 1, one scaling factor per matrix and ``scale`` 128.

  The optimizer state of a projected ``m×n`` matrix is its rank-1 projection vector and two moments of
  ``max(m, n)`` values (plus the limiter's norm): SGD's memory, in effect. The reference's settings for
  it (README and scripts): rank 1, ``scale_type="tensor"``, ``scale`` 128 (larger for larger models),
  ``update_proj_gap`` 200, lr 0.01 (the APOLLO paper's 1B run also reports lr 0.02).

  Args:
    learning_rate: a float or an optax schedule.
    **kwargs: :func:`apollo_adamw`'s, with defaults ``rank=1``, ``scale=128.0`` and ``scale_type="tensor"``.
      APOLLO-Mini is rank 1 and tensor-wise by definition: another ``rank`` or ``scale_type`` raises (use
      ``apollo_adamw(scale_type="tensor", rank=r)``).

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import apollo_mini
    >>> tx = apollo_mini(1e-2)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu['attn']['kernel'].shape  # rank-1 moments
    (8, 1)
  """
  for name, value in (("rank", 1), ("scale_type", "tensor")):
    if kwargs[name] != value:
      raise ValueError(f"{name}={kwargs[name]!r}: APOLLO-Mini is rank 1 and tensor-wise; for a tensor-wise APOLLO "
                       "of another rank use apollo_adamw(scale_type='tensor', rank=...)")
  return apollo_adamw(learning_rate, **kwargs)


@_forwards_to(galore_adamw, on_refresh="project_first")
def golore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    switch_step: int,
    svd_algorithm: str | None = None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
  r"""GoLore's ``golore_adamw``: :func:`galore_adamw` whose refreshes turn random at ``switch_step``.

  The bases come from :class:`~galore_jax.GoLoreRefresh`: the exact SVD of the gradient at refreshes before
  ``switch_step``, a Haar-random orthonormal basis from then on. At every refresh the first moment is carried
  into the new basis, :math:`m \leftarrow Q_{new}^\top Q_{old}\, m` (per side), and the second moment is
  kept, as the reference's ``AdamW`` does (``on_refresh="project_first"``, the default here). The reference's
  step is galore-torch's AdamW, the same as :func:`galore_adamw`'s.

  Args:
    learning_rate: a float or an optax schedule.
    switch_step: the first step (completed steps) whose refresh is random; the reference sets it to a
      fraction of training (``--rand_ratio 0.8`` in its pre-training script). Must be an int ``>= 0``.
    svd_algorithm: algorithm of the SVD before the switch (see :func:`galore_jax.svd_basis`).
    **kwargs: :func:`galore_adamw`'s (Adam's constants, weight decay, the :class:`~galore_jax.GaLoreOptions`
      fields) but ``refresh`` (GoLore's own), with ``on_refresh="project_first"`` by default.
      ``refresh_seed`` seeds the random bases.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import golore_adamw
    >>> tx = golore_adamw(1e-2, switch_step=100, rank=2)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates['attn']['kernel'].shape
    (8, 4)

  References:
    He et al., *Subspace Optimization for Large Language Models with Convergence Guarantees*, ICML 2025
    (arXiv:2410.11289); code github.com/pkumelon/Golore.
  """
  refresh = kwargs.pop("refresh", "svd")
  if refresh != "svd":
    raise ValueError(f"refresh={refresh!r}: golore_adamw refreshes by GoLoreRefresh(switch_step) (exact SVD, then "
                     "random); use galore(refresh=...) for another refresh")
  return galore_adamw(learning_rate, refresh=GoLoreRefresh(switch_step, svd_algorithm), **kwargs)


@_forwards_to(galore_adamw, basis_dtype="int4", adaptive_gap=AdaptiveGap())
def q_galore_adamw(learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformationExtraArgs:
  r"""Q-GaLore's projections on :func:`galore_adamw`: INT4 bases and the adaptive refresh gap, on by default.

  Each basis is stored as 4-bit codes with an fp32 scale and zero point per ``basis_group_size`` (256)
  values (:class:`~galore_jax.QuantizedBasis`, ``basis_dtype="int4"``) and dequantized to fp32 to
  project, :math:`\hat Q = s\,(c - z)` with :math:`|\hat Q - Q| \le s/2` entrywise; a refresh quantizes the
  new SVD basis once. Each leaf's gap grows while its subspace stays put
  (:class:`~galore_jax.AdaptiveGap`). Not here: Q-GaLore's INT8 weights with stochastic rounding (a model
  change) and its 8-bit Adam states (use :func:`galore_adamw_8bit` with ``basis_dtype="int4"`` and
  ``adaptive_gap=AdaptiveGap()``).

  Args:
    learning_rate: a float or an optax schedule.
    **kwargs: :func:`galore_adamw`'s (Adam's constants, weight decay, the :class:`~galore_jax.GaLoreOptions`
      fields), with defaults ``basis_dtype="int4"`` and ``adaptive_gap=AdaptiveGap()``;
      ``basis_group_size`` must divide each basis's ``d·r``.

  Example:
    >>> import jax.numpy as jnp
    >>> from galore_jax import q_galore_adamw
    >>> tx = q_galore_adamw(1e-2, rank=2, basis_group_size=8)
    >>> params = {'attn': {'kernel': jnp.ones((8, 4))}}
    >>> state = tx.init(params)
    >>> state[0].bases['attn/kernel'].output.codes.shape, state[0].bases['attn/kernel'].output.codes.dtype
    ((2, 2), dtype('uint8'))

  References:
    Zhang et al., *Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients*
    (arXiv:2407.08296); code github.com/VITA-Group/Q-GaLore.
  """
  return galore_adamw(learning_rate, **kwargs)
