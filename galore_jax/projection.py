"""The projection math of GaLore, as plain functions on Flax-layout gradients.

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class Basis(NamedTuple):
  """Orthonormal bases of one (possibly batched) matrix; ``None`` = that side is not projected."""

  input: jax.Array | None  # [..., m, r]
  output: jax.Array | None  # [..., n, r]


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


def clipped_rank(rank: int, m: int, n: int) -> int:
  """The reference silently keeps ``min(rank, m, n)`` singular vectors."""
  return min(rank, m, n)


SVD_ALGORITHMS = ("qr", "jacobi", "polar", "divide_and_conquer")
"""Names accepted by ``svd_algorithm`` (those missing from the installed jax's ``SvdAlgorithm`` are refused)."""


def _svd_algorithm(name: str | None):
  """``jax.lax.linalg.SvdAlgorithm`` member for ``name``; ``None`` = ``jnp.linalg.svd``'s default."""
  if name is None:
    return None
  members = getattr(getattr(jax.lax.linalg, "SvdAlgorithm", None), "__members__", {})
  member = members.get(str(name).upper())
  if member is None:
    raise ValueError(f"svd_algorithm={name!r}: this jax offers {sorted(m.lower() for m in members)} or None")
  return member


def _svd(x: jax.Array, algorithm: str | None = None):
  """Thin SVD ``u, s, vh`` of ``x [..., m, n]`` with a chosen ``jax.lax.linalg.svd`` algorithm.

  Jacobi and polar are not implemented on CPU in jax 0.10: there the default
  algorithm runs instead (chosen per platform at lowering, so the same jitted
  code runs on CPU and GPU).
  """
  alg = _svd_algorithm(algorithm)
  if alg is None:
    return jnp.linalg.svd(x, full_matrices=False)
  chosen = lambda a: tuple(jax.lax.linalg.svd(a, full_matrices=False, algorithm=alg))
  if alg.name in ("JACOBI", "POLAR"):
    plain = lambda a: tuple(jnp.linalg.svd(a, full_matrices=False))
    return jax.lax.platform_dependent(x, cpu=plain, default=chosen)
  return chosen(x)


def svd_basis(grad: jax.Array, rank: int, sides: Sides, algorithm: str | None = None) -> Basis:
  """Top-``rank`` singular vectors of ``grad [..., m, n]``, computed in fp32 (batched over leading axes).

  ``algorithm``: ``None`` (``jnp.linalg.svd``: on GPU cuSOLVER's Jacobi solver
  only when both dimensions are ≤ 1024, the slow QR-based one otherwise) or one
  of :data:`SVD_ALGORITHMS` for ``jax.lax.linalg.svd``.
  """
  u, _, vh = _svd(grad.astype(jnp.float32), algorithm)
  return Basis(
      input=u[..., :, :rank] if sides.input else None,
      output=jnp.swapaxes(vh[..., :rank, :], -1, -2) if sides.output else None,
  )


def identity_basis(shape: tuple[int, ...], rank: int, sides: Sides, dtype) -> Basis:
  """A valid orthonormal basis (leading unit vectors) used before the first refresh."""
  *batch, m, n = shape

  def eye(d):
    return jnp.broadcast_to(jnp.eye(d, rank, dtype=dtype), (*batch, d, rank))

  return Basis(input=eye(m) if sides.input else None, output=eye(n) if sides.output else None)


def _exact_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x @ y`` in full fp32 whatever the platform's default (which may be TF32 on a GPU, one bf16 pass on a TPU).

  For the Rayleigh–Ritz half of a randomized refresh: the Gram matrix squares
  the spectrum, so a rounding error of ~1e-3·‖B‖² would swamp every
  eigenvalue below it, and ``Q U`` must stay orthonormal. The range finder's
  products keep the default: an error in the span found costs energy only
  quadratically.
  """
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


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
    return _exact_matmul(jnp.swapaxes(q_new, -1, -2).astype(jnp.float32), q_old.astype(jnp.float32))

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


def replicated(x: jax.Array) -> jax.Array:
  """``x`` whole on every device of the current mesh, for the SVD and QR (custom calls that cannot be partitioned).

  Under Explicit mesh axes a sharded operand makes them raise, so ``x`` is resharded; under Auto axes the
  partitioner would gather it too, the constraint says so. Without a mesh (or on one device) ``x`` is returned as is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
  if mesh.explicit_axes and any(s is not None for s in spec):
    x = jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  if mesh.auto_axes:
    x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())
  return x


RefreshFn = Callable[[jax.Array, Basis, int], Basis]
"""``refresh(grad_fp32 [..., m, n], previous_basis, rank) -> Basis``; the sides needed are those of ``previous_basis``."""


def _sides(basis: Basis) -> Sides:
  return Sides(input=basis.input is not None, output=basis.output is not None)


def exact_refresh(grad: jax.Array, previous: Basis, rank: int) -> Basis:
  """The reference's refresh: an exact SVD of the current gradient."""
  return svd_basis(grad, rank, _sides(previous))


@dataclasses.dataclass(frozen=True)
class ExactRefresh:
  """Exact SVD refresh with a chosen ``jax.lax.linalg.svd`` algorithm (see :func:`svd_basis`).

  ``ExactRefresh()`` is :func:`exact_refresh`; ``ExactRefresh("jacobi")`` uses
  cuSOLVER's Jacobi SVD on GPU for any size (and the default one on CPU).
  Hashable, so it can be a static argument.
  """

  svd_algorithm: str | None = None

  def __post_init__(self):
    _svd_algorithm(self.svd_algorithm)  # fail at construction on an unknown name

  def __call__(self, grad: jax.Array, previous: Basis, rank: int) -> Basis:
    return svd_basis(grad, rank, _sides(previous), self.svd_algorithm)


def _orth(x: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``x [..., d, k]`` (reduced QR; zero columns give unit vectors, never NaN)."""
  return jnp.linalg.qr(x, mode="reduced")[0]


def _lu_basis(x: jax.Array) -> jax.Array:
  """Well-conditioned (not orthonormal) columns spanning ``x [..., d, k]``: the permuted unit-lower factor of
  a partial-pivoting LU, as fbpca normalises between power iterations (cheaper than QR, never NaN)."""
  lu, _, perm = jax.lax.linalg.lu(x)
  d, k = x.shape[-2:]
  lower = jnp.tril(lu[..., :, :k], -1) + jnp.eye(d, k, dtype=x.dtype)
  inverse = jnp.argsort(perm, axis=-1)
  return jnp.take_along_axis(lower, inverse[..., :, None], axis=-2)


def _gaussian(key, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal ``shape``; ``key`` is one key or an array of keys with shape ``shape[:-2]``."""
  key_shape = tuple(jnp.shape(key))
  if not key_shape:
    return jax.random.normal(key, shape, jnp.float32)
  if key_shape != tuple(shape[:-2]):
    raise ValueError(f"key array of shape {key_shape} does not match the batch shape {tuple(shape[:-2])}")
  flat = jnp.reshape(key, (-1,))
  draws = jax.vmap(lambda k: jax.random.normal(k, shape[-2:], jnp.float32))(flat)
  return draws.reshape(shape)


class Sketch(NamedTuple):
  """The tall-matrix half of a randomized refresh (:func:`randomized_sketch`), batched over leading axes.

  ``d`` is the dimension being found (the input one unless only the output
  side is projected), ``e`` the other one, ``k`` the sketch width.
  """

  range: jax.Array  # [..., d, k] orthonormal: the range found
  small: jax.Array  # [..., k, k]: Gram matrix B Bᵀ (B = Qᵀ A) for one side; R₂ᵀ (Aᵀ Q = Q₂ R₂) for both
  other: jax.Array | None  # [..., e, k] orthonormal Q₂ (both sides only)


def randomized_sketch(
    grad: jax.Array,
    rank: int,
    sides: Sides,
    *,
    key,
    oversampling: int = 10,
    iterations: int = 1,
    previous: Basis | None = None,
    warm: jax.Array | bool = True,
    stabilizer: str = "qr",
) -> Sketch:
  """Everything of :func:`randomized_svd_basis` that touches ``grad``: the range finder and the small matrix.

  What is left (:func:`finish_sketch`) is one ``k×k`` factorisation and one
  matmul per matrix, which is what makes it worth batching across matrices.
  Arguments as in :func:`randomized_svd_basis`.
  """
  if stabilizer not in ("qr", "lu"):
    raise ValueError(f"stabilizer={stabilizer!r} is not 'qr' or 'lu'")
  norm = _orth if stabilizer == "qr" else _lu_basis
  a = grad.astype(jnp.float32)
  transpose = sides.output and not sides.input
  if transpose:
    a = jnp.swapaxes(a, -1, -2)
  *batch, m, n = a.shape
  k = min(rank + oversampling, m, n)
  at = lambda x: jnp.swapaxes(x, -1, -2)
  omega = _gaussian(key, (*batch, n, k))
  if previous is not None:
    q_left, q_right = (previous.output, previous.input) if transpose else (previous.input, previous.output)
    if q_right is not None:
      seed = q_right.astype(jnp.float32)
    elif q_left is not None:
      seed = at(a) @ q_left.astype(jnp.float32)
    else:
      seed = None
    if seed is not None:
      r = min(seed.shape[-1], k)
      warm_omega = jnp.concatenate([seed[..., :r], omega[..., r:]], axis=-1)
      omega = jnp.where(jnp.asarray(warm), warm_omega, omega)
  q = a @ omega
  for _ in range(iterations):
    q = a @ norm(at(a) @ norm(q))
  q = _orth(q)
  if sides.input and sides.output:
    q2, r2 = jnp.linalg.qr(_exact_matmul(at(a), q), mode="reduced")  # Aᵀ Q = Q₂ R₂, so Qᵀ A = R₂ᵀ Q₂ᵀ
    return Sketch(range=q, small=at(r2), other=q2)
  b = _exact_matmul(at(q), a)
  return Sketch(range=q, small=_exact_matmul(b, at(b)), other=None)


EIGH_ALGORITHMS = ("jacobi",)
"""Names accepted by ``eigh_algorithm`` besides ``None`` (the backend's default)."""


def _check_eigh_algorithm(algorithm: str | None) -> None:
  if algorithm is not None and algorithm not in EIGH_ALGORITHMS:
    raise ValueError(f"eigh_algorithm={algorithm!r} is not None or one of {EIGH_ALGORITHMS}")


def _eigh(x: jax.Array, algorithm: str | None = None):
  """``eigh`` of symmetric ``x [..., k, k]``, ascending; ``"jacobi"`` = cuSOLVER's Jacobi solver on GPU, the
  default elsewhere (jax has no Jacobi eigh on CPU; chosen per platform at lowering)."""
  _check_eigh_algorithm(algorithm)
  if algorithm is None:
    return jnp.linalg.eigh(x)
  jacobi = lambda a: tuple(jax.lax.linalg.eigh(a, implementation=jax.lax.linalg.EighImplementation.JACOBI))[::-1]
  plain = lambda a: tuple(jnp.linalg.eigh(a))
  return jax.lax.platform_dependent(x, cpu=plain, default=jacobi)


def finish_sketch(sketch: Sketch, rank: int, sides: Sides, svd_algorithm: str | None = None,
                  eigh_algorithm: str | None = None) -> Basis:
  """The bases from a :class:`Sketch`, in singular-vector order (batched over leading axes).

  One side: the eigenvectors ``U_b`` of the Gram matrix ``B Bᵀ`` are ``B``'s
  left singular vectors and ``Q U_b`` the basis. Squaring the spectrum only
  blurs directions whose ``σ²`` are equal to working precision relative to
  ``σ₁²``, which carry no energy that matters, and never produces NaN (``B = 0``
  gives unit vectors). Both sides: ``svd(R₂ᵀ) = U_b S V_bᵀ`` gives
  ``A ≈ (Q U_b) S (Q₂ V_b)ᵀ``.
  """
  at = lambda x: jnp.swapaxes(x, -1, -2)
  q = sketch.range
  if sides.input and sides.output:
    ub, _, vbh = _svd(sketch.small, svd_algorithm)
    left = _exact_matmul(q, ub[..., :, :rank])
    right = _exact_matmul(sketch.other, at(vbh)[..., :, :rank])
  else:
    _, evecs = _eigh(sketch.small, eigh_algorithm)
    left = _exact_matmul(q, jnp.flip(evecs, axis=-1)[..., :, :rank])
    right = None
  if sides.output and not sides.input:
    left, right = right, left
  return Basis(input=left if sides.input else None, output=right if sides.output else None)


def randomized_svd_basis(
    grad: jax.Array,
    rank: int,
    sides: Sides,
    *,
    key,
    oversampling: int = 10,
    iterations: int = 1,
    previous: Basis | None = None,
    warm: jax.Array | bool = True,
    svd_algorithm: str | None = None,
    stabilizer: str = "qr",
    eigh_algorithm: str | None = None,
) -> Basis:
  """Top-``rank`` singular subspaces of ``grad [..., m, n]`` by a randomized range finder (Halko et al. 2011).

  With ``k = min(rank + oversampling, m, n)``: a test matrix ``Ω [..., n', k]``
  (``n'`` the dimension not being found), ``Q = qr(A Ω)``, then ``iterations``
  rounds of stabilised subspace iteration ``Q = qr(A norm(Aᵀ norm(Q)))``, and a
  finishing small factorisation: for both sides ``Aᵀ Q = Q₂ R₂`` and
  ``svd(R₂ᵀ) = U_b S V_bᵀ`` (a ``k×k`` SVD) give ``A ≈ (Q U_b) S (Q₂ V_b)ᵀ``;
  for one side the eigenvectors ``U_b`` of the ``k×k`` Gram matrix
  ``(QᵀA)(QᵀA)ᵀ`` give ``Q U_b`` (one matmul and a small ``eigh``, no QR of the
  long side). Either way the bases come out in singular-vector order (top
  ``rank`` columns kept), which keeps moments kept across a refresh meaningful.
  ``A`` is ``grad`` when the input side is wanted and ``gradᵀ`` when only the
  output side is, so the range finder always works on the side it returns;
  ``full`` gets both sides from the one factorisation. This is
  :func:`finish_sketch` of :func:`randomized_sketch`.

  Args:
    grad: fp32 ``[..., m, n]``; leading axes are batch axes.
    rank: columns kept (already clipped to ``min(m, n)``).
    sides: which bases to return.
    key: a PRNG key, or an array of keys with the batch shape ``grad.shape[:-2]``
      (one test matrix per batch element, so stacking matrices does not change
      their draws).
    oversampling: ``p``, extra columns of the test matrix.
    iterations: ``q``, power (subspace) iterations; each costs two matmuls with
      ``grad`` and two normalisations of ``[d, k]`` blocks.
    previous: warm start: the test matrix's first ``rank`` columns are the
      previous basis (``Aᵀ Q_prev``, or ``Q_prev`` of the other side), the last
      ``k - rank`` stay random so that new directions can enter.
    warm: boolean scalar (may be traced): use ``previous`` (False: fully random
      test matrix, e.g. on the first refresh, when ``previous`` is a placeholder).
    svd_algorithm: algorithm of the small ``k×k`` SVD of the two-sided case (see :func:`svd_basis`).
    stabilizer: how the blocks are normalised *between* power iterations:
      ``"qr"`` (orthonormalised, most robust) or ``"lu"`` (permuted unit-lower LU
      factor, as fbpca; about 3-5× cheaper than a QR of the tall block on CPU).
      The block entering the finishing step is always orthonormalised by QR.
    eigh_algorithm: ``None`` or ``"jacobi"`` for the small ``eigh`` of the one-sided case.
  """
  sketch = randomized_sketch(grad, rank, sides, key=key, oversampling=oversampling, iterations=iterations,
                             previous=previous, warm=warm, stabilizer=stabilizer)
  return finish_sketch(sketch, rank, sides, svd_algorithm, eigh_algorithm)


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


BATCH_BUDGET_BYTES = 256 << 20
"""Default cap on the sketches a two-stage refresh finishes in one batched call."""


@dataclasses.dataclass(frozen=True)
class RandomizedRefresh:
  """Randomized refresh (:func:`randomized_svd_basis`) as a ``refresh`` callable for :func:`galore_jax.galore`.

  Attributes:
    oversampling: ``p`` extra test columns (default 10).
    iterations: ``q`` power iterations (default 1; on real Llama gradients at
      rank 64 q = 1 keeps ≥ 99.99% of the exact basis's energy, see bench/refresh.py).
    warm_start: seed the test matrix with the previous basis (subspace iteration
      across refreshes); the first refresh is always cold. Worth it with ``iterations=0``.
    svd_algorithm: algorithm of the small ``k×k`` SVD (two-sided bases only).
    stabilizer: ``"lu"`` (default, fbpca-style) or ``"qr"`` normalisation
      between power iterations; the final block is always orthonormalised by QR.
    align: flip each new column to point the way of the previous basis's column
      (:func:`align_signs`), so that moments kept across a refresh keep their sign.
    eigh_algorithm: ``None`` (the backend's ``eigh``) or ``"jacobi"`` (cuSOLVER's
      Jacobi solver on GPU) for the small ``k×k`` eigenproblem of one-sided bases.
    batch_budget_bytes: :func:`galore_jax.galore` refreshes a group of
      equal-shape matrices by looping :meth:`sketch` over them and then running
      :meth:`finish` once on the stacked sketches, so that the ``k×k``
      factorisations go to the solver as one batch (cuSOLVER's batched ``syev``
      instead of one call per matrix). At most this many bytes of fp32 sketches
      are held at once: the group is cut into equal chunks that fit.

  Called by the transformation as ``refresh(grad, previous, rank, key=..., warm=...)``
  (or as its two stages, which give the same bases): ``key`` is derived from
  ``galore(refresh_seed=...)``, the step count and the leaf, so the bases are a
  deterministic function of the step; ``warm`` is False on the first step.
  Hashable, so it can be a static argument.
  """

  oversampling: int = 10
  iterations: int = 1
  warm_start: bool = False
  svd_algorithm: str | None = None
  stabilizer: str = "lu"
  align: bool = True
  eigh_algorithm: str | None = None
  batch_budget_bytes: int = BATCH_BUDGET_BYTES

  def __post_init__(self):
    if self.oversampling < 0 or self.iterations < 0:
      raise ValueError(f"oversampling and iterations must be >= 0, got {self.oversampling}, {self.iterations}")
    if self.stabilizer not in ("qr", "lu"):
      raise ValueError(f"stabilizer={self.stabilizer!r} is not 'qr' or 'lu'")
    _check_eigh_algorithm(self.eigh_algorithm)
    if self.batch_budget_bytes < 0:
      raise ValueError(f"batch_budget_bytes must be >= 0, got {self.batch_budget_bytes}")
    _svd_algorithm(self.svd_algorithm)

  def sketch(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, warm=True) -> Sketch:
    """The part that reads ``grad``: the range finder and the ``k×k`` matrix (:func:`randomized_sketch`)."""
    if key is None:
      key = jax.random.key(0)
    return randomized_sketch(
        grad, rank, _sides(previous), key=key, oversampling=self.oversampling, iterations=self.iterations,
        previous=previous if self.warm_start else None, warm=warm, stabilizer=self.stabilizer)

  def finish(self, sketch: Sketch, previous: Basis, rank: int, *, warm=True) -> Basis:
    """The bases from sketches, batched over leading axes (:func:`finish_sketch`, then :func:`align_signs`)."""
    basis = finish_sketch(sketch, rank, _sides(previous), self.svd_algorithm, self.eigh_algorithm)
    return align_signs(basis, previous, warm) if self.align else basis

  def __call__(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, warm=True) -> Basis:
    return self.finish(self.sketch(grad, previous, rank, key=key, warm=warm), previous, rank, warm=warm)


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
