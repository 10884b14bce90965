"""The dense linear algebra a refresh needs, chosen per platform: SVD, ``eigh``, QR, LU, exact matmuls.

Every function here works on batches (leading axes) and in fp32. The choices that differ by platform
(cuSOLVER's Jacobi solvers on GPU, LAPACK on CPU) are made at lowering with
``jax.lax.platform_dependent``, so one jitted program runs everywhere.

On CPU a batch of matrices reaches LAPACK one matrix at a time (:func:`decompose`): jaxlib's
batched LAPACK kernels split the batch over XLA's intra-op thread pool and block a pool thread until
it is done, so batched calls running at once on every pool thread (one per device of a multi-device
CPU mesh, or concurrent calls in one program) wait for each other forever.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SVD_ALGORITHMS = ("qr", "jacobi", "polar", "divide_and_conquer")
"""Names accepted by ``svd_algorithm`` (those missing from the installed jax's ``SvdAlgorithm`` are refused)."""

EIGH_ALGORITHMS = ("jacobi",)
"""Names accepted by ``eigh_algorithm`` besides ``None`` (the backend's default)."""


def decompose(x: jax.Array, cpu, other=None) -> tuple:
  """``cpu(x)`` on CPU, one matrix of ``x [..., m, n]`` at a time; ``other(x)`` (default ``cpu``), batched, elsewhere.

  Both return a tuple of arrays batched like ``x``. On CPU a ``lax.map`` over the flattened batch: an
  unbatched LAPACK call runs on its caller's thread, whereas a batched one parks a pool thread until
  work it queued on that same pool is done (see the module docstring). Elsewhere the batch stays one
  call (cuSOLVER's batched solvers are the point on a GPU).
  """
  other = other or cpu
  batch = x.shape[:-2]

  def mapped(a):
    outs = jax.lax.map(cpu, a.reshape(-1, *a.shape[-2:]))
    return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)

  one_at_a_time = cpu if math.prod(batch) <= 1 else mapped
  if one_at_a_time is other:  # one matrix and one method: nothing differs by platform
    return other(x)
  return jax.lax.platform_dependent(x, cpu=one_at_a_time, default=other)


def svd_algorithm(name: str | None):
  """``jax.lax.linalg.SvdAlgorithm`` member for ``name``; ``None`` = ``jnp.linalg.svd``'s default."""
  if name is None:
    return None
  members = getattr(getattr(jax.lax.linalg, "SvdAlgorithm", None), "__members__", {})
  member = members.get(str(name).upper())
  if member is None:
    raise ValueError(f"svd_algorithm={name!r}: this jax offers {sorted(m.lower() for m in members)} or None")
  return member


def svd(x: jax.Array, algorithm: str | None = None):
  """Thin SVD ``u, s, vh`` of ``x [..., m, n]`` with a chosen ``jax.lax.linalg.svd`` algorithm.

  Jacobi and polar are not implemented on CPU in jax 0.10: there the default
  algorithm runs instead (chosen per platform at lowering, so the same jitted
  code runs on CPU and GPU).
  """
  alg = svd_algorithm(algorithm)
  plain = lambda a: tuple(jnp.linalg.svd(a, full_matrices=False))
  if alg is None:
    return decompose(x, plain)
  chosen = lambda a: tuple(jax.lax.linalg.svd(a, full_matrices=False, algorithm=alg))
  return decompose(x, plain if alg.name in ("JACOBI", "POLAR") else chosen, chosen)


def check_eigh_algorithm(algorithm: str | None) -> None:
  if algorithm is not None and algorithm not in EIGH_ALGORITHMS:
    raise ValueError(f"eigh_algorithm={algorithm!r} is not None or one of {EIGH_ALGORITHMS}")


def eigh(x: jax.Array, algorithm: str | None = None):
  """``eigh`` of symmetric ``x [..., k, k]``, ascending; ``"jacobi"`` = cuSOLVER's Jacobi solver on GPU, the
  default elsewhere (jax has no Jacobi eigh on CPU; chosen per platform at lowering)."""
  check_eigh_algorithm(algorithm)
  plain = lambda a: tuple(jnp.linalg.eigh(a))
  if algorithm is None:
    return decompose(x, plain)
  jacobi = lambda a: tuple(jax.lax.linalg.eigh(a, implementation=jax.lax.linalg.EighImplementation.JACOBI))[::-1]
  return decompose(x, plain, jacobi)


def exact_matmul(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x @ y`` in full fp32 whatever the platform's default (which may be TF32 on a GPU, one bf16 pass on a TPU).

  For the Rayleigh–Ritz half of a randomized refresh: the Gram matrix squares
  the spectrum, so a rounding error of ~1e-3·‖B‖² would swamp every
  eigenvalue below it, and ``Q U`` must stay orthonormal. The range finder's
  products keep the default: an error in the span found costs energy only
  quadratically.
  """
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reduced QR ``q, r`` of ``x [..., d, k]``."""
  return decompose(x, lambda a: tuple(jnp.linalg.qr(a, mode="reduced")))


def orth(x: jax.Array) -> jax.Array:
  """Orthonormal columns spanning ``x [..., d, k]`` (reduced QR; zero columns give unit vectors, never NaN)."""
  return qr(x)[0]


def lu_basis(x: jax.Array) -> jax.Array:
  """Well-conditioned (not orthonormal) columns spanning ``x [..., d, k]``: the permuted unit-lower factor of
  a partial-pivoting LU, as fbpca normalises between power iterations (cheaper than QR, never NaN)."""
  lu, _, perm = decompose(x, lambda a: tuple(jax.lax.linalg.lu(a)))
  d, k = x.shape[-2:]
  lower = jnp.tril(lu[..., :, :k], -1) + jnp.eye(d, k, dtype=x.dtype)
  inverse = jnp.argsort(perm, axis=-1)
  return jnp.take_along_axis(lower, inverse[..., :, None], axis=-2)


def gaussian(key, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal ``shape``; ``key`` is one key or an array of keys with shape ``shape[:-2]``."""
  key_shape = tuple(jnp.shape(key))
  if not key_shape:
    return jax.random.normal(key, shape, jnp.float32)
  if key_shape != tuple(shape[:-2]):
    raise ValueError(f"key array of shape {key_shape} does not match the batch shape {tuple(shape[:-2])}")
  flat = jnp.reshape(key, (-1,))
  draws = jax.vmap(lambda k: jax.random.normal(k, shape[-2:], jnp.float32))(flat)
  return draws.reshape(shape)


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
