"""Fira: GaLore's low-rank Adam plus the gradient outside the subspace, scaled as Adam would scale it.

Chen et al., *Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?*
(arXiv:2410.01623); reference implementation PyPI ``fira==1.0.2`` (``FiraAdamW``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim.adam import scale_by_adam_hf
from galore_jax.optim.basis import Basis, project_back
from galore_jax.optim.options import takes_galore_options
from galore_jax.optim.plan import LeafPlan
from galore_jax.optim.rules import check_channel_factor, check_norm_growth_limit, limit_norm_growth, norm_ratio
from galore_jax.optim.transform import galore


def residual_axis(low_shape: tuple[int, ...]) -> int:
  """The axis of the low-rank matrix ``[..., a, b]`` along which Fira's channel norms are taken.

  The reference takes them along torch dim ``0 if low.shape[0] < low.shape[1] else 1`` of its low-rank
  tensor, which is ours transposed (``(b, a)``): torch dim 0 is our axis -1, torch dim 1 our axis -2.
  """
  a, b = low_shape[-2:]
  return -1 if b < a else -2


@dataclasses.dataclass(frozen=True)
class FiraRule:
  r"""Fira's update of a projected leaf (an update rule of :func:`galore_jax.galore`).

  With ``R = project(G)``, ``N = inner(R)`` (Adam's normalized update), the basis ``Q`` and ``α = scale``:

  .. math::
    \phi &= \|N\|_{c} / (\|R\|_{c} + 10^{-8}) \quad\text{per channel } c \\
    S &= (G - \alpha\,Q Q^\top G)\,\phi, \quad\text{then the norm-growth limiter (γ)} \\
    U &= \alpha\,Q N + S

  The channel norms run along one axis of the low-rank matrices (:func:`residual_axis`), so ``φ`` scales
  the channels of the unprojected dimension. The residual subtracts the *scaled* projection ``α Q Qᵀ G``,
  as the reference's ``p.grad - project_back(R)`` does (its ``project_back`` multiplies by α). State: the
  limiter's last norm per matrix (fp32 ``[*batch]``), unless ``norm_growth_limit`` is None.
  """

  norm_growth_limit: float | None = 1.01

  @property
  def stateful(self) -> bool:
    return self.norm_growth_limit is not None

  def init(self, plan: LeafPlan) -> jax.Array | None:
    check_channel_factor("fira", plan, plan.low_rank_shape, residual_axis(plan.low_rank_shape))
    return jnp.zeros(plan.batch_shape, jnp.float32) if self.stateful else None

  def __call__(self, plan, grad, basis: Basis, low_grad, low_update, state, count, scale):
    basis32 = Basis(*(None if q is None else q.astype(jnp.float32) for q in basis))
    low_grad = low_grad.astype(jnp.float32)
    back = scale * project_back(low_update, basis).astype(jnp.float32)
    residual = grad.astype(jnp.float32) - scale * project_back(low_grad, basis32)
    residual = residual * norm_ratio(low_update, low_grad, residual_axis(low_grad.shape))
    if self.stateful:
      residual, state = limit_norm_growth(residual, state, count == 0, self.norm_growth_limit)
    return (back + residual).astype(grad.dtype), state


@takes_galore_options
def fira(inner: optax.GradientTransformation | None = None, *, norm_growth_limit: float | None = 1.01,
         **options) -> optax.GradientTransformationExtraArgs:
  r"""Fira around an inner transformation: :func:`galore_jax.galore` with :class:`FiraRule`.

  GaLore keeps only the part of the gradient inside the rank-``r`` subspace; Fira adds the rest back,
  :math:`G - \alpha Q Q^\top G`, scaled per channel by how much Adam rescales the low-rank gradient,
  :math:`\|N\|/\|R\|`, and held to at most ``norm_growth_limit`` (γ) growth in norm per step (see
  :class:`FiraRule`). The update is full rank while the optimizer state stays GaLore's.

  The reference measures its norms on Adam's *normalized* update and applies the step size (with bias
  correction) to the whole sum: hence the default ``inner``, ``scale_by_adam_hf(bias_correction=False)``,
  to be followed by :func:`~galore_jax.scale_by_bias_correction` and the learning rate, as in
  :func:`~galore_jax.fira_adamw`.

  Args:
    inner: the transformation in the subspace (and, at full rank, on the other leaves); default
      :func:`~galore_jax.scale_by_adam_hf` ``(bias_correction=False)``.
    norm_growth_limit: γ of the limiter (the reference's 1.01); ``None`` turns it off.
    **options: the :class:`~galore_jax.GaLoreOptions` fields (``scale`` is Fira's ``alpha``, 0.25 in its
      scripts). A ``proj_type`` whose channel factor cannot scale a leaf (e.g. ``full``) raises at ``init``.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from galore_jax import fira, scale_by_bias_correction
    >>> tx = optax.chain(fira(rank=2, update_proj_gap=10), scale_by_bias_correction(), optax.scale(-1e-2))
    >>> params = {'mlp': {'kernel': jnp.ones((4, 3))}}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> sorted(state[0].rule_state)  # the limiter's last norm
    ['mlp/kernel']
  """
  check_norm_growth_limit(norm_growth_limit)
  inner = inner if inner is not None else scale_by_adam_hf(bias_correction=False)
  return galore(inner, update_rule=FiraRule(norm_growth_limit), **options)
