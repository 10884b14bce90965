"""The options of GaLore, in one place: :class:`GaLoreOptions`.

:func:`galore_jax.galore`, every alias (``galore_adamw``, ...) and the training app's ``optimizer``
config section take exactly these fields; a new option is a new field here (and a line in its docs).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from galore_jax.optim import refresh as refresh_lib
from galore_jax.optim.basis import PROJ_TYPES
from galore_jax.optim.schedule import AdaptiveGap

ON_REFRESH = ("keep", "reset", "project", "project_first")
_INJECT_HINT = "with optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap')"


def _is_positive_int(x) -> bool:
  return not isinstance(x, bool) and isinstance(x, numbers.Integral) and x > 0


@dataclasses.dataclass(frozen=True)
class GaLoreOptions:
  r"""What GaLore projects, how often it refreshes the bases, and how.

  Attributes:
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
    dimension_numbers: :class:`~galore_jax.GaLoreDimensionNumbers`, a tree of them
      (``None`` entries = default), or a callable ``(path, leaf) -> GaLoreDimensionNumbers``.
      Default: the last two axes are ``(in, out)``, leading axes are batch axes
      with one basis each.
    on_refresh: what happens to the inner state's moments when a basis changes:
      ``keep`` (reference: moments stay as they are, in the old coordinates),
      ``reset`` (zeroed; the inner step counter keeps running), ``project``
      (first moment carried into the new basis by :math:`C = Q_{new}^\top Q_{old}`;
      the second moment, which no linear map carries exactly, is mapped by the
      elementwise square :math:`C\circ C`, exact for permutations and sign
      flips and non-negative always), ``project_first`` (GoLore's reference:
      the first moment carried by ``C``, the second moment kept as it is).
      8-bit moments are dequantized, carried and requantized.
    basis_dtype: storage dtype of the bases (the SVD itself is always fp32);
      ``jnp.bfloat16`` reproduces the reference's pure-bf16 runs; ``"int4"``
      stores each side as Q-GaLore's 4-bit codes with an fp32 scale and zero
      point per group (:class:`~galore_jax.QuantizedBasis`), dequantized to fp32
      when used (the refresh's and the projection's compute dtype).
    basis_group_size: values per scale / zero point of ``"int4"`` bases (the
      reference's 256); it must divide each basis's ``d·r`` (checked at init,
      naming the leaf). Ignored for other dtypes.
    refresh: how bases are recomputed: ``"svd"`` (the reference's exact top-``r``
      subspace by a direct SVD, :class:`~galore_jax.ExactRefresh`; ``"svd_direct"``
      is the same), ``"gram"`` (the same subspace from the eigenvectors of the
      gradient's short-side Gram matrix with one deflated pass,
      :func:`~galore_jax.gram_basis`: cuSOLVER's ``syevd`` instead of its slow
      SVD on a GPU; singular vectors of ``σ`` below ~1e-6·σ₁ may differ from
      the SVD's, see docs/optimizer.md),
      ``"randomized"`` (:class:`~galore_jax.RandomizedRefresh`: range finder with
      10 oversampling columns and 1 LU-stabilised power iteration),
      ``"randomized_warm"`` (test matrix seeded by the previous basis plus 10
      random columns, no power iteration), ``"random"``
      (:class:`~galore_jax.RandomProjection`: APOLLO's Gaussian projection, not
      orthonormal, so ``on_refresh="project"`` and ``adaptive_gap`` are refused), or a callable
      ``(grad_fp32 [..., m, n], previous_basis, rank) -> Basis`` such as
      ``ExactRefresh(svd_algorithm="jacobi")`` (list it in ``static_args`` of
      :func:`optax.inject_hyperparams`). A callable that accepts the keywords
      ``key`` (a PRNG key, or keys with the batch shape) and/or ``warm`` (False on
      step 0, when the previous basis is a placeholder) receives them.
    refresh_seed: seed of the refresh's random test matrices: at step ``t`` the
      ``k``-th matrix of the tree (leaves in tree order, a stacked leaf counting
      one matrix per batch element) draws from ``split(fold_in(key(refresh_seed), t))[k]``,
      so the bases are a deterministic function of the step, whatever the grouping.
    stagger: spread the leaves' refreshes over the gap so that no single step
      pays for all of them (see :func:`~galore_jax.refresh_offsets`): every leaf
      still refreshes on step 0, then leaf ``i`` on the steps ``t`` with
      ``(t - offset_i) % update_proj_gap == 0``.
    batch_refresh: refresh the leaves with equal ``(m, n, rank, sides)`` that
      refresh on the same step in one batched call (stacked along a new leading
      axis; one ``lax.cond`` per offset). Costs a stacked fp32 copy of those
      gradients while the refresh runs. Without it, each group of equal shapes
      gets one ``lax.cond`` around a ``fori_loop`` over its members, so the
      program holds one copy of the refresh per distinct shape.
    adaptive_gap: ``None`` (fixed gap) or :class:`~galore_jax.AdaptiveGap`: each
      leaf keeps its own gap in ``GaLoreState.schedule`` and lengthens it while
      its subspace stays put (``batch_refresh`` does not apply).
  """

  rank: int | Callable[[str, tuple[int, ...]], int] = 128
  update_proj_gap: int = 200
  scale: float | jax.Array = 0.25
  proj_type: str = "std"
  target: Any = None
  dimension_numbers: Any = None
  on_refresh: str = "keep"
  basis_dtype: jax.typing.DTypeLike = "float32"
  basis_group_size: int = 256
  refresh: str | refresh_lib.RefreshFn = "svd"
  refresh_seed: int = 0
  stagger: bool = False
  batch_refresh: bool = False
  adaptive_gap: AdaptiveGap | None = None

  def __post_init__(self):
    if isinstance(self.rank, jax.Array):
      raise TypeError(f"rank must be a static int; {_INJECT_HINT}")
    if not callable(self.rank) and not _is_positive_int(self.rank):
      raise ValueError(f"rank must be a positive int or a callable (path, shape) -> int, got {self.rank!r}")
    if isinstance(self.update_proj_gap, jax.Array):
      raise TypeError(f"update_proj_gap must be a static int; {_INJECT_HINT}")
    if not _is_positive_int(self.update_proj_gap):
      raise ValueError(f"update_proj_gap must be a positive int, got {self.update_proj_gap!r}")
    if self.proj_type not in PROJ_TYPES:
      raise ValueError(f"proj_type={self.proj_type!r} is not one of {PROJ_TYPES}")
    if self.on_refresh not in ON_REFRESH:
      raise ValueError(f"on_refresh={self.on_refresh!r} is not one of {ON_REFRESH}")
    if self.adaptive_gap is not None and not isinstance(self.adaptive_gap, AdaptiveGap):
      raise TypeError(f"adaptive_gap must be None or an AdaptiveGap, got {self.adaptive_gap!r}")
    if not refresh_lib.is_orthonormal(refresh_lib.resolve(self.refresh)):
      # C = Q_newᵀ Q_old and the overlap of two bases mean something only for orthonormal columns.
      if self.on_refresh in ("project", "project_first"):
        raise ValueError(f"on_refresh={self.on_refresh!r} needs orthonormal bases, but refresh={self.refresh!r} "
                         "draws random projections: use on_refresh='keep' (as APOLLO) or 'reset'")
      if self.adaptive_gap is not None:
        raise ValueError(f"adaptive_gap measures how far an orthonormal basis moved, but refresh={self.refresh!r} "
                         "draws random projections: use a fixed update_proj_gap")
    if isinstance(self.basis_group_size, jax.Array):
      # optax.inject_hyperparams makes every number an array; only int4 bases read this one (statically)
      if str(self.basis_dtype) == "int4":
        raise TypeError(f"basis_group_size must be a static int; {_INJECT_HINT[:-1]}, 'basis_group_size')")
    elif not _is_positive_int(self.basis_group_size) or self.basis_group_size % 2:
      raise ValueError(f"basis_group_size must be a positive even int, got {self.basis_group_size!r}")
    try:
      jnp.dtype(self.basis_dtype)
    except TypeError:
      raise ValueError(f"basis_dtype={self.basis_dtype!r} is not a dtype") from None

  def as_kwargs(self) -> dict[str, Any]:
    """The options as keyword arguments (shallow: an :class:`AdaptiveGap` stays one)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def takes_galore_options(fn=None, /, **defaults):
  """Give ``fn(..., **options)`` the options as keyword-only parameters in its signature.

  ``inspect.signature`` (IDEs, :func:`optax.inject_hyperparams`) then lists every
  :class:`GaLoreOptions` field with its default; ``fn`` builds the object itself. Used as
  ``@takes_galore_options(scale=1.0, refresh="random")`` it also changes those defaults for ``fn``
  (a method whose options mean other things by default, e.g. APOLLO's).
  """
  if fn is None:
    return functools.partial(takes_galore_options, **defaults)
  fields = {f.name: f for f in dataclasses.fields(GaLoreOptions)}
  unknown = set(defaults) - set(fields)
  if unknown:
    raise TypeError(f"{sorted(unknown)} are not GaLoreOptions fields")
  signature = inspect.signature(fn)
  params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
  params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(f.name, f.default),
                               annotation=f.type) for f in fields.values()]
  wrapper = fn
  if defaults:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      return fn(*args, **{**defaults, **kwargs})
  wrapper.__signature__ = signature.replace(parameters=params)
  return wrapper
