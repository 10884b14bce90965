"""Bases and the projection math of GaLore, as plain functions on Flax-layout gradients.

A Flax kernel multiplies from the right, ``y = x @ K``, so a gradient ``G`` of
shape ``[..., m, n]`` has the *input* dimension ``m`` on axis -2 and the
*output* dimension ``n`` on axis -1; leading axes are batch axes (stacked or
scanned layers), each with a basis of its own. The PyTorch weight of the same
layer is ``W = Kᵀ`` with shape ``(n, m)``.

A :class:`Basis` holds orthonormal columns for the input side, the output side,
or both::

  input basis   Q_in  [..., m, r]   R = Q_inᵀ G          [..., r, n]
  output basis  Q_out [..., n, r]   R = G Q_out          [..., m, r]
  both                              R = Q_inᵀ G Q_out    [..., r, r]

and the way back is ``Q_in R``, ``R Q_outᵀ`` or ``Q_in R Q_outᵀ``. With
``G = U S Vᵀ`` the top-``r`` singular vectors give ``Q_in = U[:, :r]`` and
``Q_out = V[:, :r]``. In galore-torch's vocabulary (on ``W = Gᵀ``) the input
side is ``right`` and the output side is ``left``.

Example:
  >>> import jax.numpy as jnp
  >>> from galore_jax import Basis, project, project_back
  >>> basis = Basis(input=jnp.eye(4, 2), output=None)
  >>> low = project(jnp.ones((4, 3)), basis)
  >>> low.shape, project_back(low, basis).shape
  ((2, 3), (4, 3))
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from galore_jax.optim.linalg import exact_matmul

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class Basis(NamedTuple):
  """Orthonormal bases of one (possibly batched) matrix; ``None`` = that side is not projected."""

  input: jax.Array | None  # [..., m, r]
  output: jax.Array | None  # [..., n, r]


class QuantizedBasis(NamedTuple):
  r"""One side's basis ``Q [..., d, r]`` stored as 4-bit codes with a scale and zero point per group (Q-GaLore).

  The columns are laid out one after the other (``Qᵀ [..., r, d]`` flattened) and cut into groups of
  ``group_size`` values; group ``g`` with minimum ``lo`` and maximum ``hi`` stores

  .. math::
    s_g = \max(hi - lo, 10^{-5}) / 15, \quad z_g = -\mathrm{round}(lo / s_g), \quad
    c = \mathrm{clip}(\mathrm{round}(q / s_g) + z_g, 0, 15), \quad \hat q = s_g (c - z_g)

  so :math:`|\hat q - q| \le s_g / 2` for every entry. Two codes share a byte (low nibble first), so the
  codes take ``d·r/2`` bytes: real 4-bit storage, where the reference keeps one code per ``uint8`` (8 bits
  a code). The zero point is not clamped to ``[0, 15]`` as the reference's is (a group whose values all
  have one sign would then clip codes and break the bound); it is stored in fp32 as the scale.
  """

  codes: jax.Array  # uint8 [..., r, d // 2]: row j holds column j of Q, two codes a byte
  scale: jax.Array  # float32 [..., d·r / group_size]
  zero: jax.Array  # float32 [..., d·r / group_size], an integer value


INT4_LEVELS = 15


def is_quantized(basis_dtype) -> bool:
  """Whether ``basis_dtype`` asks for :class:`QuantizedBasis` storage (``"int4"``)."""
  return isinstance(basis_dtype, str) and basis_dtype == "int4" or (
      not isinstance(basis_dtype, str) and jnp.dtype(basis_dtype) == jnp.dtype("int4"))


def quantization_problem(d: int, rank: int, group_size: int) -> str | None:
  """Why a ``[d, rank]`` basis cannot be stored in groups of ``group_size`` 4-bit codes, or None."""
  if d % 2:
    return f"the projected dimension {d} is odd (two 4-bit codes share a byte along it)"
  if (d * rank) % group_size:
    return f"basis_group_size={group_size} does not divide the basis size {d}x{rank} = {d * rank}"
  return None


def quantize_basis(q: jax.Array, group_size: int) -> QuantizedBasis:
  """``q [..., d, r]`` → :class:`QuantizedBasis` (asymmetric 4-bit, ``group_size`` values a group)."""
  *batch, d, r = q.shape
  x = jnp.swapaxes(q, -1, -2).astype(jnp.float32).reshape(*batch, d * r // group_size, group_size)
  lo, hi = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
  scale = jnp.maximum(hi - lo, 1e-5) / INT4_LEVELS
  zero = -jnp.round(lo / scale)
  codes = jnp.clip(jnp.round(x / scale[..., None]) + zero[..., None], 0, INT4_LEVELS).astype(jnp.uint8)
  codes = codes.reshape(*batch, r, d)
  return QuantizedBasis(codes[..., 0::2] | (codes[..., 1::2] << 4), scale, zero)


def dequantize_basis(qb: QuantizedBasis, dtype=jnp.float32) -> jax.Array:
  """:class:`QuantizedBasis` → ``Q [..., d, r]`` in ``dtype``; the shape comes from the codes."""
  *batch, r, half = qb.codes.shape
  codes = jnp.stack([qb.codes & 15, qb.codes >> 4], axis=-1).reshape(*batch, qb.scale.shape[-1], -1)
  x = (codes.astype(jnp.float32) - qb.zero[..., None]) * qb.scale[..., None]
  return jnp.swapaxes(x.reshape(*batch, r, 2 * half), -1, -2).astype(dtype)


def load_basis(stored: Basis, dtype=jnp.float32) -> Basis:
  """The basis to compute with: quantized sides dequantized to ``dtype``, others as they are."""
  return Basis(*(dequantize_basis(q, dtype) if isinstance(q, QuantizedBasis) else q for q in stored))


def store_basis(basis: Basis, group_size: int) -> Basis:
  """Every side of ``basis`` quantized (:func:`quantize_basis`)."""
  return Basis(*(None if q is None else quantize_basis(q, group_size) for q in basis))


def keep_codes_unless_refreshed(new: Basis, loaded: Basis, stored: Basis, group_size: int) -> Basis:
  """The stored form after a step: a side whose basis changed (per matrix) quantized anew, else its codes kept.

  Re-quantizing an unchanged dequantized basis could move its scales by rounding, so the codes, scales
  and zero points of a basis that was not refreshed are carried bit for bit.
  """

  def side(q_new, q_loaded, q_stored):
    if q_new is None:
      return None
    changed = jnp.any(q_new != q_loaded, axis=(-2, -1))
    fresh = quantize_basis(q_new, group_size)
    return QuantizedBasis(*(jnp.where(changed[(...,) + (None,) * (a.ndim - changed.ndim)], a, b)
                            for a, b in zip(fresh, q_stored)))

  return Basis(*(side(*sides) for sides in zip(new, loaded, stored)))


class Sides(NamedTuple):
  """Which dimensions of a kernel ``[..., m, n]`` are projected. Static, decided from the full shape."""

  input: bool
  output: bool


def choose_sides(proj_type: str, m: int, n: int) -> Sides:
  """The reference's side rule, mapped onto a kernel of shape ``(m=in, n=out)``.

  ``std`` projects the smaller dimension (the input one when square),
  ``reverse_std`` the larger one (the output one when square), ``right`` the input
  dimension, ``left`` the output dimension and ``full`` both, exactly as
  galore-torch does on the torch weight ``(n, m)``.
  """
  if proj_type == "std":
    return Sides(input=m <= n, output=m > n)
  if proj_type == "reverse_std":
    return Sides(input=m > n, output=m <= n)
  if proj_type == "right":
    return Sides(input=True, output=False)
  if proj_type == "left":
    return Sides(input=False, output=True)
  if proj_type == "full":
    return Sides(input=True, output=True)
  raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")


def sides_of(basis: Basis) -> Sides:
  return Sides(input=basis.input is not None, output=basis.output is not None)


def clipped_rank(rank: int, m: int, n: int) -> int:
  """The reference silently keeps ``min(rank, m, n)`` singular vectors."""
  return min(rank, m, n)


def identity_basis(shape: tuple[int, ...], rank: int, sides: Sides, dtype) -> Basis:
  """A valid orthonormal basis (leading unit vectors) used before the first refresh."""
  *batch, m, n = shape

  def eye(d):
    return jnp.broadcast_to(jnp.eye(d, rank, dtype=dtype), (*batch, d, rank))

  return Basis(input=eye(m) if sides.input else None, output=eye(n) if sides.output else None)


def project(grad: jax.Array, basis: Basis) -> jax.Array:
  """Full-rank ``grad [..., m, n]`` → low-rank coordinates in ``basis``."""
  low = grad
  if basis.input is not None:
    low = jnp.swapaxes(basis.input, -1, -2) @ low
  if basis.output is not None:
    low = low @ basis.output
  return low


def project_back(low_rank: jax.Array, basis: Basis) -> jax.Array:
  """Low-rank coordinates → full-rank ``[..., m, n]``; the side comes from the basis, never the shape."""
  full = low_rank
  if basis.input is not None:
    full = basis.input @ full
  if basis.output is not None:
    full = full @ jnp.swapaxes(basis.output, -1, -2)
  return full


def change_of_basis(new: Basis, old: Basis) -> Basis:
  """Per side ``C = Q_newᵀ Q_old [..., r, r]``: low-rank coordinates map as ``C_in X C_outᵀ``."""

  def rotation(q_new, q_old):
    if q_new is None:
      return None
    return exact_matmul(jnp.swapaxes(q_new, -1, -2).astype(jnp.float32), q_old.astype(jnp.float32))

  return Basis(input=rotation(new.input, old.input), output=rotation(new.output, old.output))


def rotate(low_rank: jax.Array, rotation: Basis, squared: bool = False) -> jax.Array:
  """Carry low-rank coordinates (a first moment) into a new basis, ``C_in X C_outᵀ``.

  With ``squared=True`` the rotations are squared elementwise first: a second
  moment cannot be rotated exactly, and ``(C∘C) v`` is the map that is exact for
  signed permutations and keeps ``v ≥ 0``.
  """
  def maybe_square(c):
    return c * c if squared else c

  x = low_rank.astype(jnp.float32)
  if rotation.input is not None:
    x = maybe_square(rotation.input) @ x
  if rotation.output is not None:
    x = x @ jnp.swapaxes(maybe_square(rotation.output), -1, -2)
  return x.astype(low_rank.dtype)


def subspace_overlap(new: Basis, old: Basis) -> jax.Array:
  """Mean squared cosine of the principal angles between two bases, in ``[0, 1]``; 1 = same subspace."""
  overlaps = []
  for q_new, q_old in zip(new, old):
    if q_new is not None:
      c = jnp.swapaxes(q_new, -1, -2).astype(jnp.float32) @ q_old.astype(jnp.float32)
      overlaps.append(jnp.mean(jnp.sum(c * c, axis=(-2, -1)) / q_new.shape[-1]))
  return jnp.mean(jnp.stack(overlaps))


def align_signs(new: Basis, previous: Basis, warm: jax.Array | bool = True) -> Basis:
  """Flip each column of ``new`` that points away from the same column of ``previous`` (``q_newᵀ q_old < 0``).

  A singular vector's sign is arbitrary. LAPACK's exact SVD picks it by a rule that is nearly continuous
  in the data, so consecutive refreshes mostly agree; a randomized range finder takes it from a fresh
  random test matrix, so about half the columns would flip at every refresh, and a first moment kept
  across the refresh (``on_refresh="keep"``) would push those coordinates backwards. ``warm`` False
  (the first refresh, against a placeholder basis) leaves ``new`` as it is.
  """

  def flip(q, q_old):
    if q is None:
      return None
    dots = jnp.sum(q.astype(jnp.float32) * q_old.astype(jnp.float32), axis=-2, keepdims=True)  # [..., 1, r]
    sign = jnp.where(jnp.asarray(warm) & (dots < 0), -1.0, 1.0).astype(q.dtype)
    return q * sign

  return Basis(*(flip(q, q_old) for q, q_old in zip(new, previous)))


def captured_energy(grad: jax.Array, basis: Basis) -> jax.Array:
  """Fraction of the gradient's energy inside the subspace, ``‖project(G)‖² / ‖G‖²`` per matrix ``[...]``.

  In ``[0, 1]``; 1 for a zero gradient. For the exact top-``r`` basis it is
  ``Σ_{i≤r} σ_i² / Σ σ_i²``, the best any rank-``r`` basis can do.
  """
  g = grad.astype(jnp.float32)
  total = jnp.sum(g * g, axis=(-2, -1))
  low = project(g, Basis(*(None if q is None else q.astype(jnp.float32) for q in basis)))
  kept = jnp.sum(low * low, axis=(-2, -1))
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)
