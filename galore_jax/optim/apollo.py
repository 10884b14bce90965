"""APOLLO and APOLLO-Mini: Adam's per-channel (or per-tensor) scaling of the raw gradient, estimated in a
random low-rank space.

Zhu et al., *APOLLO: SGD-like Memory, AdamW-level Performance* (arXiv:2412.05270, MLSys 2025);
reference implementation PyPI ``apollo-torch==1.0.3`` (``APOLLOAdamW``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from galore_jax.optim.adam import scale_by_adam_hf
from galore_jax.optim.options import takes_galore_options
from galore_jax.optim.plan import LeafPlan
from galore_jax.optim.rules import check_channel_factor, check_norm_growth_limit, limit_norm_growth, norm_ratio
from galore_jax.optim.transform import galore

SCALE_TYPES = ("channel", "tensor")


def channel_axis(m: int, n: int) -> int:
  """The axis of the low-rank matrix along which APOLLO's channel norms are taken, from the kernel ``[m, n]``.

  The reference decides on the full torch gradient ``(n, m)``: dim ``0 if n < m else 1``, i.e. our axis -1
  when ``n < m`` and -2 otherwise. With ``proj_type="std"`` that is the projected (rank) axis, so each
  channel of the unprojected dimension gets its own factor.
  """
  return -1 if n < m else -2


@dataclasses.dataclass(frozen=True)
class ApolloRule:
  r"""APOLLO's update of a projected leaf (an update rule of :func:`galore_jax.galore`).

  With ``R = project(G)`` on a random projection, ``N = inner(R)`` (Adam's normalized update) and ``s = scale``:

  .. math::
    \phi &= \|N\|_{c} / (\|R\|_{c} + 10^{-8}) \text{ per channel } c \ (\texttt{channel}),
       \text{ or } \|N\| / (\|R\| + 10^{-8}) \ (\texttt{tensor}) \\
    U &= \sqrt{s}\ \mathrm{limit}(G\,\phi) \quad (\texttt{scale\_front}: \mathrm{limit}(\sqrt{s}\,G\,\phi))

  ``N`` serves only to estimate the factor: the update is the raw gradient, rescaled. ``limit`` is the
  norm-growth limiter (γ = ``norm_growth_limit``; ``None`` is the reference's ``disable_nl``). State:
  the limiter's last norm per matrix (fp32 ``[*batch]``).
  """

  scale_type: str = "channel"
  scale_front: bool = False
  norm_growth_limit: float | None = 1.01

  @property
  def stateful(self) -> bool:
    return self.norm_growth_limit is not None

  def init(self, plan: LeafPlan) -> jax.Array | None:
    if self.scale_type == "channel":
      check_channel_factor("apollo", plan, plan.low_rank_shape, channel_axis(plan.m, plan.n))
    return jnp.zeros(plan.batch_shape, jnp.float32) if self.stateful else None

  def __call__(self, plan, grad, basis, low_grad, low_update, state, count, scale):
    axis = channel_axis(*grad.shape[-2:]) if self.scale_type == "channel" else None
    scaled = grad.astype(jnp.float32) * norm_ratio(low_update, low_grad, axis)
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    if self.scale_front:
      scaled = scaled * root
    if self.stateful:
      scaled, state = limit_norm_growth(scaled, state, count == 0, self.norm_growth_limit)
    if not self.scale_front:
      scaled = scaled * root
    return scaled.astype(grad.dtype), state


@takes_galore_options(scale=1.0, refresh="random")
def apollo(inner: optax.GradientTransformation | None = None, *, scale_type: str = "channel", scale_front: bool = False,
           norm_growth_limit: float | None = 1.01, **options) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO around an inner transformation: :func:`galore_jax.galore` with :class:`ApolloRule`.

  Adam runs on ``R = Pᵀ G`` for a random Gaussian ``P`` (:class:`~galore_jax.RandomProjection`, re-drawn
  every ``update_proj_gap`` steps; the moments are kept across re-draws, as the reference does); the
  ratio ``‖Adam(R)‖ / ‖R‖``, per channel or per tensor, then scales the *full* gradient, which passes
  the norm-growth limiter and a factor ``√scale``. No SVD, and with rank 1 and ``scale_type="tensor"``
  (APOLLO-Mini, :func:`~galore_jax.apollo_mini`) the state is a few numbers per matrix.

  The reference measures its norms on Adam's *normalized* update and applies the step size (with bias
  correction) at the end: hence the default ``inner``, ``scale_by_adam_hf(bias_correction=False)``, to be
  followed by :func:`~galore_jax.scale_by_bias_correction` and the learning rate, as in
  :func:`~galore_jax.apollo_adamw`.

  Args:
    inner: the transformation in the subspace (and, at full rank, on the other leaves); default
      :func:`~galore_jax.scale_by_adam_hf` ``(bias_correction=False)``.
    scale_type: ``"channel"`` (APOLLO: one factor per channel of the unprojected dimension) or ``"tensor"``
      (APOLLO-Mini: one per matrix).
    scale_front: apply ``√scale`` before the limiter rather than after (the reference's ``scale_front``,
      recommended for short warmups).
    norm_growth_limit: γ of the limiter (1.01); ``None`` turns it off (the reference's ``disable_nl``).
    **options: the :class:`~galore_jax.GaLoreOptions` fields, with APOLLO's defaults ``scale=1.0`` (the
      reference's ``scale``, applied as ``√scale``) and ``refresh="random"`` (the reference's
      ``proj="random"``; ``refresh="svd"`` is its ``proj="svd"``). ``on_refresh="project"`` and
      ``adaptive_gap`` need orthonormal bases and are refused with random projections. The reference does
      not clip ``rank`` to the matrix for random projections; here, as for every projection, it is
      ``min(rank, m, n)``.

  Example:
    >>> import optax, jax.numpy as jnp
    >>> from galore_jax import apollo, scale_by_bias_correction
    >>> tx = optax.chain(apollo(rank=2, update_proj_gap=10), scale_by_bias_correction(), optax.scale(-1e-2))
    >>> params = {'mlp': {'kernel': jnp.ones((4, 3))}}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> state[0].bases['mlp/kernel'].output.shape  # a Gaussian P, on the smaller side
    (3, 2)
  """
  if scale_type not in SCALE_TYPES:
    raise ValueError(f"scale_type={scale_type!r} is not one of {SCALE_TYPES}")
  check_norm_growth_limit(norm_growth_limit)
  inner = inner if inner is not None else scale_by_adam_hf(bias_correction=False)
  return galore(inner, update_rule=ApolloRule(scale_type, bool(scale_front), norm_growth_limit), **options)
