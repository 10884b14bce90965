"""How a basis is recomputed: exact (Gram eigensolver or SVD), a randomized range finder, or a random projection.

A refresh is a callable ``refresh(grad_fp32 [..., m, n], previous_basis, rank) -> Basis`` (optionally
accepting the keywords ``key``, ``warm`` and ``step``); :func:`galore_jax.galore` takes one as ``refresh=`` or
by name (:data:`REFRESH_METHODS`). A two-stage refresh also has ``sketch`` (the part that reads the
gradient) and ``finish`` (small factorisations, batched across matrices), as :class:`RandomizedRefresh` and
:class:`ExactRefresh`'s Gram method.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax.optim import linalg
from galore_jax.optim.basis import Basis, Sides, align_signs, sides_of
from galore_jax.optim.linalg import exact_matmul


def svd_basis(grad: jax.Array, rank: int, sides: Sides, algorithm: str | None = None) -> Basis:
  """Top-``rank`` singular vectors of ``grad [..., m, n]``, computed in fp32 (batched over leading axes).

  ``algorithm``: ``None`` (``jnp.linalg.svd``: on GPU cuSOLVER's Jacobi solver
  only when both dimensions are ≤ 1024, the slow QR-based one otherwise) or one
  of :data:`~galore_jax.optim.linalg.SVD_ALGORITHMS` for ``jax.lax.linalg.svd``.
  """
  u, _, vh = linalg.svd(grad.astype(jnp.float32), algorithm)
  return Basis(
      input=u[..., :, :rank] if sides.input else None,
      output=jnp.swapaxes(vh[..., :rank, :], -1, -2) if sides.output else None,
  )


RefreshFn = Callable[[jax.Array, Basis, int], Basis]
"""``refresh(grad_fp32 [..., m, n], previous_basis, rank) -> Basis``; the sides needed are those of
``previous_basis``."""


def exact_refresh(grad: jax.Array, previous: Basis, rank: int) -> Basis:
  """The reference's refresh computed as the reference does: one direct SVD of the current gradient
  (``refresh="svd"``; ``refresh="gram"`` computes the same subspace by the Gram matrix, :func:`gram_basis`)."""
  return svd_basis(grad, rank, sides_of(previous))


BATCH_BUDGET_BYTES = 256 << 20
"""Default cap on the sketches a two-stage refresh finishes in one batched call."""


class GramSketch(NamedTuple):
  """The part of an exact Gram refresh that reads the gradient (:func:`gram_sketch`), batched over leading axes.

  ``A`` is ``G / max|G|`` oriented short side first (``[..., s, l]``): ``G`` when ``m < n``, ``Gᵀ`` when
  ``m > n``; a square ``G`` is transposed when only its output side is wanted.
  """

  gram: jax.Array  # [..., s, s]: A Aᵀ at Precision.HIGHEST
  scaled: jax.Array | None  # [..., s, l]: A itself, kept only when the long side's basis is wanted


def _short_side_first(shape: tuple[int, ...], sides: Sides) -> tuple[bool, bool, bool]:
  """``(transpose, short side wanted, long side wanted)`` for a gradient of ``shape [..., m, n]``."""
  m, n = shape[-2:]
  # a square matrix with only its output side wanted is transposed too, so that no long side is needed
  transpose = m > n or (m == n and sides.output and not sides.input)
  return transpose, (sides.output if transpose else sides.input), (sides.input if transpose else sides.output)


def gram_sketch(grad: jax.Array, sides: Sides, deflate: bool = False) -> GramSketch:
  """The Gram matrix of the short side of ``grad / max|grad|`` (and the scaled gradient when the long side is wanted
  or ``deflate``, whose second pass reads it).

  The scaling by the largest magnitude (1 for a zero matrix) keeps the squares of tiny (1e-30) or huge (1e30)
  gradients inside fp32's range; the bases do not depend on it.
  """
  transpose, _, want_long = _short_side_first(grad.shape, sides)
  a = grad.astype(jnp.float32)
  if transpose:
    a = jnp.swapaxes(a, -1, -2)
  peak = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
  a = a / jnp.where(peak > 0, peak, 1.0)
  gram = exact_matmul(a, jnp.swapaxes(a, -1, -2))  # TF32 / one bf16 pass would blur every λ below ~1e-3·λ₁
  return GramSketch(gram=gram, scaled=a if want_long or deflate else None)


def largest_entry_positive(q: jax.Array) -> jax.Array:
  """Flip each column of ``q [..., d, r]`` so that its entry of largest magnitude (the first such) is positive."""
  at = jnp.argmax(jnp.abs(q), axis=-2, keepdims=True)
  return q * jnp.where(jnp.take_along_axis(q, at, axis=-2) < 0, -1.0, 1.0).astype(q.dtype)


GRAM_DEFLATIONS = 1
"""Deflated passes of ``refresh="gram"`` (:class:`ExactRefresh`'s default): with one, the singular vectors of
``σ`` down to ~1e-5·σ₁ match the SVD's."""

TRUSTED_EIGENVALUE = 1e-4
"""In each pass of :func:`deflated_eigenvectors`, eigenvalues at or above this fraction of the pass's largest are
taken as they are: fp32 rounds each to about ``1e-7·λ_max``, so their directions hold to ~1e-3."""


def _descending_eigh(gram: jax.Array, eigh_algorithm: str | None) -> tuple[jax.Array, jax.Array]:
  evals, evecs = linalg.eigh(gram, eigh_algorithm)
  return jnp.flip(evals, axis=-1), jnp.flip(evecs, axis=-1)


def deflated_eigenvectors(a: jax.Array, gram: jax.Array, rank: int, deflations: int,
                          eigh_algorithm: str | None = None) -> jax.Array:
  r"""The top-``rank`` left singular vectors of ``a [..., s, l]`` from ``1 + deflations`` Gram eigensolves, each
  resolving about four more decades of ``λ = σ²`` (one eigensolve: ``σ`` down to about ``3e-4·σ₁``).

  Pass one: ``gram = A Aᵀ = U Λ Uᵀ``; the eigenvectors with ``λ ≥`` :data:`TRUSTED_EIGENVALUE` ``·λ₁`` are
  kept as they are. A deflated pass takes the rows ``B = Uᵀ A`` of the others (those of the kept ones set to
  zero: ``A`` with the kept directions removed, in ``U``'s coordinates, formed from ``A`` rather than from the
  Gram matrix, which would keep its rounding) and solves ``B Bᵀ = W Λ' Wᵀ``: its largest eigenvalue is below
  ``1e-4·λ₁``, so fp32 resolves it that much further down, and ``U W`` are its singular vectors of ``A``,
  orthogonal to the kept ones by construction. The last pass keeps all of its vectors; the ``rank`` of largest
  ``λ`` are orthonormalised by QR (signs: ``R``'s diagonal positive).
  """
  evals, rotation = _descending_eigh(gram, eigh_algorithm)
  basis, rows, keys, candidates = rotation, a, [], []
  for _ in range(deflations):
    trusted = evals >= TRUSTED_EIGENVALUE * evals[..., :1]
    keys.append(jnp.where(trusted, evals, -jnp.inf))  # a pass's trusted eigenvalues top every later pass's
    candidates.append(basis)
    rows = exact_matmul(jnp.swapaxes(rotation, -1, -2), rows) * (~trusted)[..., :, None].astype(a.dtype)
    evals, rotation = _descending_eigh(exact_matmul(rows, jnp.swapaxes(rows, -1, -2)), eigh_algorithm)
    basis = exact_matmul(basis, rotation)
  keys.append(evals)  # the last pass keeps all of its vectors
  candidates.append(basis)
  order = jnp.argsort(-jnp.concatenate(keys, axis=-1), axis=-1)[..., :rank]
  picked = jnp.take_along_axis(jnp.concatenate(candidates, axis=-1), order[..., None, :], axis=-1)
  q, r = linalg.qr(picked)
  return q * jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)[..., None, :]


def finish_gram(sketch: GramSketch, rank: int, sides: Sides, transposed: bool,
                eigh_algorithm: str | None = None, deflations: int = 0) -> Basis:
  """The top-``rank`` bases from a :class:`GramSketch` (batched); ``transposed``: the short side is the output one.

  The eigenvectors of ``A Aᵀ`` in descending order are the short side's ``U_r`` (with ``deflate``, by
  :func:`deflated_eigenvectors`: the sketch must hold ``A``); the long side is ``qr(Aᵀ U_r)``, whose columns
  are ``Aᵀ u_i / σ_i`` in exact arithmetic, with the sign that makes ``u_iᵀ A v_i = σ_i ≥ 0``. QR instead of
  the division keeps them orthonormal when ``σ_i`` is 0.
  """
  want_short, want_long = (sides.output, sides.input) if transposed else (sides.input, sides.output)
  if deflations:
    short = deflated_eigenvectors(sketch.scaled, sketch.gram, rank, deflations, eigh_algorithm)
  else:
    short = _descending_eigh(sketch.gram, eigh_algorithm)[1][..., :, :rank]
  short = largest_entry_positive(short)
  long = None
  if want_long:
    x = exact_matmul(jnp.swapaxes(sketch.scaled, -1, -2), short)  # [..., l, r] = V_r Σ_r
    long, r = linalg.qr(x)
    long = long * jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)[..., None, :]
    if not want_short:  # a one-sided basis follows the one rule, whichever side it is
      long = largest_entry_positive(long)
  short = short if want_short else None
  return Basis(input=long, output=short) if transposed else Basis(input=short, output=long)


def _is_transposed(sketch: GramSketch, previous: Basis) -> bool:
  """Whether a sketch's short side is the output one (``m > n``, or a square matrix's output side alone), read off
  the shapes of the sketch and the basis."""
  s = sketch.gram.shape[-1]
  if previous.input is not None:  # m is the short side unless m > n (a square matrix is not transposed)
    return previous.input.shape[-2] != s
  return previous.output.shape[-2] == s  # output side only: transposed when n is the short side (or n = m)


def gram_basis(grad: jax.Array, rank: int, sides: Sides, eigh_algorithm: str | None = None,
               deflations: int = GRAM_DEFLATIONS) -> Basis:
  r"""Top-``rank`` singular subspaces of ``grad [..., m, n]`` from the eigenvectors of its short side's Gram matrix.

  The same subspace as :func:`svd_basis` (the reference's rule), computed as one product and one symmetric
  eigensolver call on the short side ``s = min(m, n)`` instead of an SVD: with ``A = G / max|G|`` oriented
  ``[s, l]``,

  .. math:: A A^\top = U \Sigma^2 U^\top, \qquad Q_{short} = U_{:, :r}, \qquad
            Q_{long} = \operatorname{qr}(A^\top U_{:, :r}) = V_{:, :r}.

  The Gram matrix is formed in fp32 at ``Precision.HIGHEST``; on a GPU the eigensolver is cuSOLVER's
  ``syevd`` (over leading axes too), which avoids ``gesvd``'s QR-based bidiagonalisation of the whole gradient
  (each kernel's time per shape: ``python -m bench.refresh_parts --parts exact``).

  Numerics: squaring squares the condition number. One eigensolve (``deflations=0``) loses the singular values
  below about ``sqrt(eps)·σ₁ ≈ 3e-4·σ₁`` (fp32) in rounding, so directions *among* them come out arbitrary
  (still orthonormal), while the top subspace above that floor stays accurate. Real gradients early in
  training have ``σ_r/σ₁`` of 1e-8..1e-4 at the paper ranks, and there those last columns matter: the SVD's
  capture more of the *later* gradients of the gap (bench/exact_refresh.py ``--later``). Each deflated pass
  (:func:`deflated_eigenvectors`) removes the directions already resolved and solves again on the rest,
  reaching about two more decades of ``σ`` for one more product with ``A`` and one more eigensolve; below
  ~1e-6·σ₁ the fp32 residual's rounding is the floor, where :func:`svd_basis` (``~eps·σ₁``) still does
  better. A zero or rank-deficient gradient gives orthonormal columns, never NaN.

  Signs: each column of a one-sided basis, and the short side of a two-sided one, has its largest-magnitude
  entry positive; the long side of a two-sided basis pairs with it (``u_iᵀ G v_i ≥ 0``). The rule is
  deterministic but is not LAPACK's, and nothing ties it to the previous basis's signs.

  Args:
    grad: ``[..., m, n]``, any float dtype (computed in fp32); leading axes are batch axes.
    rank: columns kept (already clipped to ``min(m, n)``).
    sides: which bases to return.
    eigh_algorithm: ``None`` (the backend's ``eigh``) or ``"jacobi"`` (cuSOLVER's Jacobi solver on GPU).
    deflations: deflated passes after the first eigensolve (:data:`GRAM_DEFLATIONS`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import Sides, gram_basis, svd_basis
    >>> g = jax.random.normal(jax.random.key(0), (6, 9)) * jnp.arange(1.0, 10.0)
    >>> q = gram_basis(g, 2, Sides(True, True))
    >>> ref = svd_basis(g, 2, Sides(True, True))
    >>> bool(jnp.allclose(q.input @ q.input.T, ref.input @ ref.input.T, atol=1e-4))
    True
    >>> q.output.shape
    (9, 2)

  References:
    Golub & Van Loan, *Matrix Computations* (4th ed.), §8.6: the SVD from the symmetric eigenproblem of
    ``AᵀA`` and why it loses the small singular values.
  """
  return finish_gram(gram_sketch(grad, sides, deflations > 0), rank, sides, _short_side_first(grad.shape, sides)[0],
                     eigh_algorithm, deflations)


EXACT_METHODS = ("gram", "svd")


@dataclasses.dataclass(frozen=True)
class ExactRefresh:
  """The reference's refresh, the exact top-``r`` singular subspace of the fp32 gradient, by one of two methods.

  ``method="gram"`` (``refresh="gram"``; ``method=None`` without ``svd_algorithm``): :func:`gram_basis`, the
  eigenvectors of the short side's Gram matrix, as a two-stage refresh: :meth:`sketch` forms the Gram matrix
  (one matmul reading the gradient) and :meth:`finish` runs the eigensolver, so a group of equal shapes is
  finished in one batched ``eigh``. ``method="svd"`` (``refresh="svd"``, the default of
  :func:`galore_jax.galore`): :func:`svd_basis`, one direct SVD per matrix, as the reference;
  ``svd_algorithm`` picks ``jax.lax.linalg.svd``'s algorithm (e.g. ``"jacobi"``, cuSOLVER's Jacobi SVD on GPU).
  ``method=None`` is ``"svd"`` when ``svd_algorithm`` is given, so ``ExactRefresh("jacobi")`` keeps meaning a
  Jacobi SVD, and ``"gram"`` otherwise.

  Attributes:
    svd_algorithm: ``None`` or one of :data:`~galore_jax.optim.linalg.SVD_ALGORITHMS` (``method="svd"``).
    method: ``"gram"``, ``"svd"`` or ``None`` (see above).
    eigh_algorithm: ``None`` or ``"jacobi"`` for the Gram matrix's eigensolver.
    deflations: the Gram method's deflated passes (:func:`deflated_eigenvectors`; 0: one eigensolve).
    batch_budget_bytes: the most bytes of stacked sketches (``s×s`` Gram matrices, plus the scaled gradients
      when a long side is wanted) finished in one batched call.

  Hashable, so it can be a static argument.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import Basis, ExactRefresh
    >>> g = jax.random.normal(jax.random.key(0), (8, 5))
    >>> ExactRefresh()(g, Basis(input=None, output=jnp.zeros((5, 2))), 2).output.shape
    (5, 2)
    >>> ExactRefresh("jacobi").method_used, ExactRefresh().method_used
    ('svd', 'gram')
  """

  svd_algorithm: str | None = None
  method: str | None = None
  eigh_algorithm: str | None = None
  deflations: int = GRAM_DEFLATIONS
  batch_budget_bytes: int = BATCH_BUDGET_BYTES

  def __post_init__(self):
    linalg.svd_algorithm(self.svd_algorithm)  # fail at construction on an unknown name
    linalg.check_eigh_algorithm(self.eigh_algorithm)
    if self.method is not None and self.method not in EXACT_METHODS:
      raise ValueError(f"method={self.method!r} is not None or one of {EXACT_METHODS}")
    if self.method == "gram" and self.svd_algorithm is not None:
      raise ValueError(f"svd_algorithm={self.svd_algorithm!r} needs method='svd' (the Gram method runs no SVD)")
    if self.batch_budget_bytes < 0:
      raise ValueError(f"batch_budget_bytes must be >= 0, got {self.batch_budget_bytes}")
    if not isinstance(self.deflations, int) or self.deflations < 0:
      raise ValueError(f"deflations must be an int >= 0, got {self.deflations!r}")

  @property
  def method_used(self) -> str:
    """``"gram"`` or ``"svd"``: :attr:`method`, or what ``None`` stands for."""
    return self.method or ("svd" if self.svd_algorithm is not None else "gram")

  @property
  def two_stage(self) -> bool:
    """Whether the executors may split it into :meth:`sketch` and :meth:`finish` (the Gram method only)."""
    return self.method_used == "gram"

  def sketch(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, warm=True) -> GramSketch:
    """The part that reads ``grad``: the scaled Gram matrix (:func:`gram_sketch`)."""
    del rank, key, warm
    return gram_sketch(grad, sides_of(previous), self.deflations > 0)

  def finish(self, sketch: GramSketch, previous: Basis, rank: int, *, warm=True) -> Basis:
    """The bases from Gram sketches, batched over leading axes (:func:`finish_gram`)."""
    del warm
    return finish_gram(sketch, rank, sides_of(previous), _is_transposed(sketch, previous), self.eigh_algorithm,
                       self.deflations)

  def __call__(self, grad: jax.Array, previous: Basis, rank: int) -> Basis:
    if self.method_used == "svd":
      return svd_basis(grad, rank, sides_of(previous), self.svd_algorithm)
    return gram_basis(grad, rank, sides_of(previous), self.eigh_algorithm, self.deflations)


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
  norm = linalg.orth if stabilizer == "qr" else linalg.lu_basis
  a = grad.astype(jnp.float32)
  transpose = sides.output and not sides.input
  if transpose:
    a = jnp.swapaxes(a, -1, -2)
  *batch, m, n = a.shape
  k = min(rank + oversampling, m, n)
  at = lambda x: jnp.swapaxes(x, -1, -2)
  omega = linalg.gaussian(key, (*batch, n, k))
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
  q = linalg.orth(q)
  if sides.input and sides.output:
    q2, r2 = linalg.qr(exact_matmul(at(a), q))  # Aᵀ Q = Q₂ R₂, so Qᵀ A = R₂ᵀ Q₂ᵀ
    return Sketch(range=q, small=at(r2), other=q2)
  b = exact_matmul(at(q), a)
  return Sketch(range=q, small=exact_matmul(b, at(b)), other=None)


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
    ub, _, vbh = linalg.svd(sketch.small, svd_algorithm)
    left = exact_matmul(q, ub[..., :, :rank])
    right = exact_matmul(sketch.other, at(vbh)[..., :, :rank])
  else:
    _, evecs = linalg.eigh(sketch.small, eigh_algorithm)
    left = exact_matmul(q, jnp.flip(evecs, axis=-1)[..., :, :rank])
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
  deflations: int = GRAM_DEFLATIONS
  batch_budget_bytes: int = BATCH_BUDGET_BYTES

  def __post_init__(self):
    if self.oversampling < 0 or self.iterations < 0:
      raise ValueError(f"oversampling and iterations must be >= 0, got {self.oversampling}, {self.iterations}")
    if self.stabilizer not in ("qr", "lu"):
      raise ValueError(f"stabilizer={self.stabilizer!r} is not 'qr' or 'lu'")
    linalg.check_eigh_algorithm(self.eigh_algorithm)
    if self.batch_budget_bytes < 0:
      raise ValueError(f"batch_budget_bytes must be >= 0, got {self.batch_budget_bytes}")
    linalg.svd_algorithm(self.svd_algorithm)

  def sketch(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, warm=True) -> Sketch:
    """The part that reads ``grad``: the range finder and the ``k×k`` matrix (:func:`randomized_sketch`)."""
    if key is None:
      key = jax.random.key(0)
    return randomized_sketch(
        grad, rank, sides_of(previous), key=key, oversampling=self.oversampling, iterations=self.iterations,
        previous=previous if self.warm_start else None, warm=warm, stabilizer=self.stabilizer)

  def finish(self, sketch: Sketch, previous: Basis, rank: int, *, warm=True) -> Basis:
    """The bases from sketches, batched over leading axes (:func:`finish_sketch`, then :func:`align_signs`)."""
    basis = finish_sketch(sketch, rank, sides_of(previous), self.svd_algorithm, self.eigh_algorithm)
    return align_signs(basis, previous, warm) if self.align else basis

  def __call__(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, warm=True) -> Basis:
    return self.finish(self.sketch(grad, previous, rank, key=key, warm=warm), previous, rank, warm=warm)


def _fold_in(key, data: int):
  """``jax.random.fold_in`` of one key or of each key of a key array."""
  if not jnp.shape(key):
    return jax.random.fold_in(key, data)
  flat = jnp.reshape(key, (-1,))
  return jnp.reshape(jax.vmap(lambda k: jax.random.fold_in(k, data))(flat), jnp.shape(key))


@dataclasses.dataclass(frozen=True)
class RandomProjection:
  r"""APOLLO's projection: a Gaussian matrix scaled by :math:`1/\sqrt{r}`, re-drawn at every refresh; no SVD.

  Each projected side gets ``P [..., d, r]`` with i.i.d. :math:`\mathcal N(0, 1/r)` entries, so that
  :math:`\mathbb E[P P^\top] = I` and norms of ``R = Pᵀ G`` estimate those of ``G`` (Johnson–Lindenstrauss).
  The columns are *not* orthonormal (``orthonormal = False``): :class:`~galore_jax.GaLoreOptions` then
  refuses ``on_refresh="project"`` and ``adaptive_gap``, which assume they are. The gradient is not read.

  The draw is a deterministic function of the step and of the matrix's place in the tree: the transformation
  passes the ``k``-th matrix of the tree at step ``t`` the key ``split(fold_in(key(refresh_seed), t))[k]``
  (the output side of a two-sided basis folds in 1). The reference (``apollo_torch``) seeds torch's generator
  with the parameter's index instead, so the two draw different matrices from the same distribution.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import Basis, RandomProjection
    >>> p = RandomProjection()(jnp.zeros((6, 4)), Basis(input=jnp.zeros((6, 2)), output=None), 2,
    ...                        key=jax.random.key(0))
    >>> p.input.shape, p.output
    ((6, 2), None)
  """

  orthonormal = False

  def __call__(self, grad: jax.Array, previous: Basis, rank: int, *, key=None) -> Basis:
    del grad
    if key is None:
      key = jax.random.key(0)
    keys = (key, _fold_in(key, 1))
    return Basis(*(None if q is None else linalg.gaussian(k, q.shape) / math.sqrt(rank)
                   for q, k in zip(previous, keys)))


def random_orthonormal(key, shape: tuple[int, ...]) -> jax.Array:
  r"""Haar-distributed orthonormal columns ``Q [..., d, r]``: QR of a Gaussian, with the signs of ``R``'s diagonal
  fixed.

  ``Z = Q R`` with ``Z`` i.i.d. :math:`\mathcal N(0, 1)`; multiplying each column of ``Q`` by
  :math:`\mathrm{sign}(R_{jj})` makes the factorisation unique, and then ``Q`` is uniform on the Stiefel
  manifold (Mezzadri 2007): without the fix LAPACK's sign convention biases it. GoLore's reference draws the
  polar factor :math:`Z (Z^\top Z)^{-1/2}` instead, which has the same (Haar) distribution; QR is cheaper and
  needs no inverse square root of a possibly ill-conditioned ``ZᵀZ``. ``key`` is one key or keys with the
  batch shape ``shape[:-2]``.
  """
  z = linalg.gaussian(key, shape)
  q, r = linalg.qr(z)
  sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  return q * sign[..., None, :]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class GoLoreRefresh:
  r"""GoLore's refresh: GaLore's exact SVD before ``switch_step``, a random orthonormal basis from it on.

  .. math::
    Q_t = \begin{cases} \mathrm{topr\text{-}SVD}(G_t) & t < t_s \\
                         \mathrm{Haar}(d, r) \ (\text{independent of } G_t) & t \ge t_s \end{cases}

  at each refresh step ``t`` (completed steps, as the reference's ``state["step"] >= rand_epoch``). The
  SVD's subspace follows the gradient's dominant directions, which near a stationary point are mostly
  noise, so GaLore need not converge; a random subspace is an unbiased estimate of the whole gradient
  (:math:`\mathbb E[QQ^\top] = \tfrac{r}{d} I`), which gives GoLore its convergence guarantee. The
  random bases come from :func:`random_orthonormal` (the output side of a two-sided basis folds 1 into
  its key), so they are a deterministic function of ``(refresh_seed, step, matrix)``. After the switch the
  gradient is not read.

  Attributes:
    switch_step: ``t_s``, the first step whose refresh is random (the reference's ``rand_epoch``, set
      there as a fraction of training: ``--rand_ratio 0.8`` in its pre-training script). 0: random from
      the start.
    svd_algorithm: algorithm of the exact SVD before the switch (see :func:`svd_basis`).

  Called by the transformation with ``key=`` (the per-matrix keys of ``refresh_seed``) and ``step=``
  (the step count, traced); without ``step`` it is the exact SVD. Hashable, so it can be a static argument.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import Basis, GoLoreRefresh
    >>> q = GoLoreRefresh(switch_step=10)(jnp.ones((6, 4)), Basis(input=jnp.zeros((6, 2)), output=None), 2,
    ...                                   key=jax.random.key(0), step=jnp.int32(10)).input
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
    True

  References:
    He et al., *Subspace Optimization for Large Language Models with Convergence Guarantees*, ICML 2025
    (arXiv:2410.11289); code github.com/pkumelon/Golore.
  """

  switch_step: int
  svd_algorithm: str | None = None

  def __post_init__(self):
    if not _is_int(self.switch_step) or self.switch_step < 0:
      raise ValueError(f"switch_step must be an int >= 0 (the first step whose refresh is random), "
                       f"got {self.switch_step!r}")
    linalg.svd_algorithm(self.svd_algorithm)

  def random(self, previous: Basis, key) -> Basis:
    """Haar bases shaped like ``previous`` (each side its own draw)."""
    if key is None:
      key = jax.random.key(0)
    keys = (key, _fold_in(key, 1))
    return Basis(*(None if q is None else random_orthonormal(k, q.shape) for q, k in zip(previous, keys)))

  def __call__(self, grad: jax.Array, previous: Basis, rank: int, *, key=None, step=None) -> Basis:
    exact = lambda: svd_basis(grad, rank, sides_of(previous), self.svd_algorithm)
    if step is None:
      return exact()
    return jax.lax.cond(jnp.asarray(step) >= self.switch_step, lambda: self.random(previous, key), exact)


def is_orthonormal(refresh) -> bool:
  """Whether a refresh returns orthonormal columns (every refresh does unless it says ``orthonormal = False``)."""
  return getattr(refresh, "orthonormal", True)


REFRESH_METHODS = {
    "svd": ExactRefresh(method="svd"),
    "svd_direct": ExactRefresh(method="svd"),  # the same: a name that says which method
    "gram": ExactRefresh(method="gram"),
    "randomized": RandomizedRefresh(),
    "randomized_warm": RandomizedRefresh(iterations=0, warm_start=True),
    "random": RandomProjection(),
}
"""The refreshes :func:`galore_jax.galore` accepts by name."""

REFRESH_KEYWORDS = ("key", "warm", "step")


def resolve(refresh: str | RefreshFn) -> RefreshFn:
  """A refresh callable from a name in :data:`REFRESH_METHODS` or a callable."""
  if callable(refresh):
    return refresh
  if refresh not in REFRESH_METHODS:
    raise ValueError(f"refresh={refresh!r} is not one of {tuple(REFRESH_METHODS)} or a callable")
  return REFRESH_METHODS[refresh]


def accepted_keywords(fn) -> frozenset[str]:
  """The optional keywords (``key``, ``warm``, ``step``) a refresh callable accepts; plain 3-argument callables get
  none."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return frozenset()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return frozenset(REFRESH_KEYWORDS)
  return frozenset(p.name for p in params if p.name in REFRESH_KEYWORDS and p.kind in (
      inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def is_two_stage(refresh) -> bool:
  """A refresh with ``sketch(grad, previous, rank, *, key, warm)`` and ``finish(sketches, previous, rank, *, warm)``
  that does not opt out by ``two_stage = False`` (:class:`ExactRefresh` with its direct SVD)."""
  return (callable(getattr(refresh, "sketch", None)) and callable(getattr(refresh, "finish", None))
          and getattr(refresh, "two_stage", True))
