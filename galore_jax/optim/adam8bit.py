"""8-bit blockwise Adam (bitsandbytes' ``Adam8bit``) as an optax transformation.

Both Adam moments are stored block by block as uint8 codes into bitsandbytes'
*dynamic* quantization maps (the first moment with the signed map, the second
with the unsigned one) plus one fp32 ``absmax`` per block; small tensors stay
fp32. Each step dequantizes, runs Adam in fp32 and requantizes, a large leaf chunk by chunk so that its fp32
temporaries stay small.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax.optim import guard

SUPPORTED_BLOCK_SIZES = (256, 2048)


# ----------------------------------------------------------------------------- quantization maps


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

  ATen computes ``step = (end - start) / (steps - 1)`` in float32 and fills the
  first half as ``start + i·step`` and the second half as ``end - (steps-1-i)·step``
  with a fused multiply-add (one rounding), emulated here in float64.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
  i = np.arange(steps, dtype=np.float64)
  halfway = steps // 2
  first = np.float64(start32) + step * i[:halfway]
  second = np.float64(end32) - step * (steps - 1 - i[halfway:])
  return np.concatenate([first, second]).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' ``functional.create_dynamic_map``, reproduced in numpy (float32, sorted).

  Dynamic exponent × linear fraction: for exponent ``i`` (``10^(i-6)``) the
  fraction takes the midpoints of an evenly spaced grid on ``[0.1, 1]`` with
  ``2^i`` (signed) or ``2^(i+1)`` (unsigned) cells, mirrored for the signed map;
  plus ``0`` and ``1``. The arithmetic mirrors bnb's (float32 linspace and
  midpoints, float32 product with the power of ten).
  """
  data: list[float] = []
  non_sign_bits = total_bits - 1
  additional_items = 2**(non_sign_bits - max_exponent_bits) - 1
  i = 0
  for i in range(max_exponent_bits):
    fraction_items = int(2**(i + non_sign_bits - max_exponent_bits) + 1 if signed else 2**
                         (i + non_sign_bits - max_exponent_bits + 1) + 1)
    boundaries = _torch_linspace_f32(0.1, 1, fraction_items)
    means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
    data += (np.float32(10**(-(max_exponent_bits - 1) + i)) * means).tolist()
    if signed:
      data += (np.float32(-(10**(-(max_exponent_bits - 1) + i))) * means).tolist()
  if additional_items > 0:
    boundaries = _torch_linspace_f32(0.1, 1, additional_items + 1)
    means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
    data += (np.float32(10**(-(max_exponent_bits - 1) + i)) * means).tolist()
    if signed:
      data += (np.float32(-(10**(-(max_exponent_bits - 1) + i))) * means).tolist()
  data.append(0)
  data.append(1.0)
  assert len(data) == 2**total_bits
  data += [0] * (256 - len(data))
  data.sort()
  return np.asarray(data, np.float32)


SIGNED_MAP = create_dynamic_map(signed=True)
UNSIGNED_MAP = create_dynamic_map(signed=False)


# ----------------------------------------------------------------------------- blockwise quantization


class QuantizedMoment(NamedTuple):
  """A blockwise-quantized fp32 tensor.

  Attributes:
    codes: uint8 ``[n_blocks, block_size]``, the tensor flattened in C order and
      zero-padded to whole blocks (never zero-size). The original shape is that
      of the parameter (or update) the moment belongs to.
    absmax: fp32 ``[n_blocks]``, the largest magnitude in each block.
  """

  codes: jax.Array
  absmax: jax.Array


def _midpoints(code: np.ndarray) -> np.ndarray:
  return ((code[:-1].astype(np.float64) + code[1:].astype(np.float64)) / 2).astype(np.float32)


def quantize_blockwise(x: jax.Array, code: np.ndarray, block_size: int = 256) -> QuantizedMoment:
  """Quantize ``x`` (any shape) block by block onto ``code`` (a sorted map on ``[-1, 1]``).

  Each block is divided by its absmax (a block of zeros stays zeros) and every
  element gets the index of the **nearest** map value; a value exactly halfway
  between two map values gets the lower index. (bitsandbytes' kernels do a
  binary search over the sorted map followed by the same nearest-neighbour
  comparison; they may differ from this only on exact midpoints.) The midpoints
  are computed in float64 and rounded to float32, the scaled value is
  ``x * (1 / absmax)`` as in bnb.
  """
  scaled, absmax = _scaled_blocks(x, block_size)
  return QuantizedMoment(codes=_nearest_code(code, scaled), absmax=absmax)


def requantize_unless(finite: jax.Array | None, x: jax.Array, old: QuantizedMoment, code: np.ndarray,
                      block_size: int = 256) -> QuantizedMoment:
  """:func:`quantize_blockwise` of ``x``, or ``old`` where ``finite`` is False (a skipped step).

  The select is made on the scaled values, before the nearest-code search: each map value is its own nearest
  code, so ``old``'s codes come back exactly. The search then reads each old code where it writes the new one,
  and XLA can overwrite the old codes in place; a select of the codes after the search would need a buffer of
  the new ones.
  """
  if finite is None:
    return quantize_blockwise(x, code, block_size)
  scaled, absmax = _scaled_blocks(x, block_size)
  scaled = jnp.where(finite, scaled, jnp.asarray(code)[old.codes.astype(jnp.int32)])
  return QuantizedMoment(codes=_nearest_code(code, scaled), absmax=jnp.where(finite, absmax, old.absmax))


def _scaled_blocks(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """``x`` flattened into zero-padded blocks ``[n_blocks, block_size]`` divided by their absmax, and the absmax."""
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  n = x.size
  n_blocks = max(1, -(-n // block_size))
  x = jnp.pad(x, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
  absmax = jnp.max(jnp.abs(x), axis=1)
  inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  return jnp.clip(x * inv[:, None], -1.0, 1.0), absmax


def _nearest_code(code: np.ndarray, scaled: jax.Array) -> jax.Array:
  return _count_below(_midpoints(code), scaled).astype(jnp.uint8)


def _count_below(sorted_values: np.ndarray, x: jax.Array) -> jax.Array:
  """``searchsorted(sorted_values, x, side="left")`` by an unrolled binary search.

  ``jnp.searchsorted``'s searches start from a constant index, whose gather from the constant table
  XLA then constant-folds into an ``x``-sized literal: seconds of compile time per large leaf. Here
  the first probe is a scalar and every later gather is data-dependent.
  """
  size = 1 << max(1, (len(sorted_values)).bit_length())  # a power of two > len, padded with +inf
  table = jnp.asarray(np.concatenate([sorted_values, np.full(size - len(sorted_values), np.inf, np.float32)]))
  step = size // 2
  idx = jnp.where(table[step - 1] < x, step, 0)
  while step > 1:
    step //= 2
    idx = jnp.where(table[idx + step - 1] < x, idx + step, idx)
  return idx


def dequantize_blockwise(q: QuantizedMoment, code: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax``, unpadded to ``shape``."""
  values = jnp.asarray(code)[q.codes.astype(jnp.int32)] * q.absmax[:, None]
  return values.reshape(-1)[:math.prod(shape)].reshape(shape)


# ----------------------------------------------------------------------------- a quantized leaf's update


def _slice_blocks(q: QuantizedMoment, start, size: int) -> QuantizedMoment:
  return QuantizedMoment(jax.lax.dynamic_slice_in_dim(q.codes, start, size),
                         jax.lax.dynamic_slice_in_dim(q.absmax, start, size))


def _put_blocks(q: QuantizedMoment, part: QuantizedMoment, start) -> QuantizedMoment:
  return QuantizedMoment(jax.lax.dynamic_update_slice_in_dim(q.codes, part.codes, start, 0),
                         jax.lax.dynamic_update_slice_in_dim(q.absmax, part.absmax, start, 0))


def _even_chunk(whole_blocks: int, chunk_blocks: int) -> int:
  """The largest divisor of ``whole_blocks`` in ``[chunk_blocks / 2, chunk_blocks]``, else ``chunk_blocks``.

  Chunks that tile the whole blocks leave no tail to update after the loop (a Llama's shapes are highly
  composite: a 32000×4096 embedding is 512000 blocks of 256, tiled by 16000).
  """
  for size in range(chunk_blocks, (chunk_blocks + 1) // 2 - 1, -1):
    if size and whole_blocks % size == 0:
      return size
  return chunk_blocks


def _update_in_chunks(step, g: jax.Array, m: QuantizedMoment, v: QuantizedMoment, chunk_blocks: int):
  """``step`` (a gradient and its quantized moments -> the update, in the gradient's dtype, and the new moments)
  over a whole leaf, ``chunk_blocks`` blocks at a time.

  Run on the whole leaf at once, the step holds fp32 copies of the leaf (the dequantized moments, their
  updates, the update) as temporaries: 2.4 GB for a 32000×4096 embedding, more than its 8-bit state. Here a
  ``fori_loop`` visits chunks of whole blocks, so the temporaries are a chunk's. Each block goes through the
  same operations as on the whole leaf; XLA fuses (and may reassociate or contract) them differently inside
  the loop, so the update can differ in the last bit or two of fp32 and, rarely, a code by one step where
  that bit crosses a rounding midpoint (tested). The codes and absmax are updated in place, and the
  update overwrites the gradient chunk by chunk (it has the gradient's dtype). The blocks after the last
  whole chunk (with the zero-padded last block) take one more step of fewer than ``2 * chunk_blocks + 1``
  blocks, which :func:`_even_chunk` avoids where it can; a leaf of fewer than two whole chunks (or any leaf,
  with ``chunk_blocks=0``) is that one step.
  """
  block_size = m.codes.shape[1]
  chunk_blocks = _even_chunk(g.size // block_size, chunk_blocks)
  n_chunks = g.size // block_size // chunk_blocks if chunk_blocks else 0
  if n_chunks < 2:  # one chunk and a tail would be no smaller than the whole leaf
    return step(g, m, v)
  loop = functools.partial(_chunk_loop, step, chunk_blocks=chunk_blocks, n_chunks=n_chunks)
  if g.dtype.itemsize != 2:
    return loop(g, m, v, carry=g.dtype)
  # XLA:CPU writes a bf16 slice by converting the whole array to fp32 and back, a pass over the leaf per chunk
  # (twice the whole-leaf update's time at 32 chunks); an integer slice it writes in place. There the loop
  # carries the gradient's bits, at the cost of one leaf-sized copy in and out.
  return jax.lax.platform_dependent(g, m, v, cpu=functools.partial(loop, carry=jnp.uint16),
                                    default=functools.partial(loop, carry=g.dtype))


def _chunk_loop(step, g, m, v, *, chunk_blocks: int, n_chunks: int, carry):
  """:func:`_update_in_chunks`'s loop, with the gradient and update carried as ``carry`` (same width)."""
  block_size, chunk = m.codes.shape[1], chunk_blocks * m.codes.shape[1]
  as_carry = lambda x: jax.lax.bitcast_convert_type(x, carry).reshape(-1)
  as_grad = lambda x: jax.lax.bitcast_convert_type(x, g.dtype)

  def body(i, state):
    flat, m, v = state
    g_blocks = jax.lax.dynamic_slice_in_dim(flat, i * chunk, chunk).reshape(chunk_blocks, block_size)
    u, m_i, v_i = step(as_grad(g_blocks), _slice_blocks(m, i * chunk_blocks, chunk_blocks),
                       _slice_blocks(v, i * chunk_blocks, chunk_blocks))
    flat = jax.lax.dynamic_update_slice_in_dim(flat, as_carry(u), i * chunk, 0)
    return flat, _put_blocks(m, m_i, i * chunk_blocks), _put_blocks(v, v_i, i * chunk_blocks)

  flat, m, v = jax.lax.fori_loop(0, n_chunks, body, (as_carry(g), m, v))
  start, tail_blocks = n_chunks * chunk_blocks, m.codes.shape[0] - n_chunks * chunk_blocks
  if tail_blocks:
    u, m_t, v_t = step(as_grad(flat[start * block_size:]), _slice_blocks(m, start, tail_blocks),
                       _slice_blocks(v, start, tail_blocks))
    flat = jax.lax.dynamic_update_slice_in_dim(flat, as_carry(u), start * block_size, 0)
    m, v = _put_blocks(m, m_t, start), _put_blocks(v, v_t, start)
  return as_grad(flat).reshape(g.shape), m, v


# ----------------------------------------------------------------------------- the optimizer


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: completed steps (int32).
    mu: first moments: per leaf an fp32 array (small leaves) or a
      :class:`QuantizedMoment` on the signed dynamic map.
    nu: second moments: likewise, on the unsigned dynamic map.
  """

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    chunk_size: int | None = 1 << 22,
) -> optax.GradientTransformation:
  r"""Adam with blockwise 8-bit moments, as bitsandbytes' ``Adam8bit`` (``optim_bits=8``, ``block_wise=True``).

  Per leaf with at least ``min_8bit_size`` elements the moments live as uint8
  codes plus one fp32 absmax per block of ``block_size`` elements (first moment:
  signed dynamic map, second: unsigned; :func:`create_dynamic_map`). Each step

  .. math::
    m = \beta_1 \mathrm{deq}(m_q) + (1-\beta_1) g,\quad
    v = \beta_2 \mathrm{deq}(v_q) + (1-\beta_2) g^2,\quad
    u = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

  then :math:`m, v` are requantized (nearest code, see :func:`quantize_blockwise`).
  ``eps`` is added **after** bias correction: that is bitsandbytes' convention
  (its 8-bit blockwise kernels, CUDA and the CPU fallback in
  ``backends/cpu/ops.py``, compute ``denom = sqrt(v)/sqrt(1-β₂ᵗ) + eps``) and
  optax's (:func:`optax.scale_by_adam`), whose arithmetic is used here, so
  leaves kept in fp32 are bit-identical to ``optax.scale_by_adam(b1, b2, eps)``.
  It is **not** galore-torch's ``GaLoreAdamW`` convention (eps before bias
  correction, :func:`galore_jax.scale_by_adam_hf`), but it is what
  ``GaLoreAdamW8bit`` (a bnb ``Optimizer2State``) does.

  Leaves with fewer than ``min_8bit_size`` elements keep fp32 moments (bnb's
  ``min_8bit_size``, default 4096); zero-size leaves keep no moments at all
  (:class:`optax.MaskedNode`), so the state never holds a zero-size array.
  The moments are updated in fp32 whatever the update dtype; the output has the
  update's dtype.

  With :func:`galore_jax.galore`, the inner state sees the low-rank shapes, so
  whether a projected leaf is quantized depends on its *low-rank* size. Its
  ``on_refresh='reset'|'project'`` dequantizes a quantized moment, resets or
  rotates it, and requantizes it.

  Args:
    b1, b2: decays of the first and second moment.
    eps: added to the bias-corrected :math:`\sqrt{\hat v}` (bnb's default 1e-8).
    block_size: elements per quantization block: 256 (bnb ≥ 0.45's blockwise
      optimizers) or 2048 (the GaLore paper's bnb).
    min_8bit_size: leaves with fewer elements keep fp32 moments.
    chunk_size: a quantized leaf of at least two such chunks (elements, rounded down to whole blocks) is
      updated chunk by chunk in a ``fori_loop`` (the same arithmetic, to the last bits of fp32), so that its fp32
      temporaries are a chunk's (16 MB each by default), not the leaf's (a 32000×4096 embedding: 0.5 GB each,
      2.4 GB in all on XLA:CPU). ``None``: every leaf at once.

  Returns:
    A :class:`~galore_jax.optim.guard.FiniteAware` transformation with :class:`ScaleByAdam8bitState`.
    State bytes of a quantized leaf of ``n`` elements: per moment
    ``ceil(n / block_size) · (block_size + 4)``. Called with ``finite=False`` (a traced bool) it keeps its
    state bit for bit, selecting each quantized moment before its nearest-code search
    (:func:`requantize_unless`).
  """
  if block_size not in SUPPORTED_BLOCK_SIZES:
    raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
  if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) or min_8bit_size < 0:
    raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                 or chunk_size < block_size):
    raise ValueError(f"chunk_size must be None or an int >= block_size ({block_size}), got {chunk_size!r}")

  chunk_blocks = chunk_size // block_size if chunk_size else 0  # 0: every leaf at once

  def quantized(size: int) -> bool:
    return size >= min_8bit_size and size > 0

  def init_leaf(p, code):
    size = math.prod(jnp.shape(p))
    if size == 0:
      return optax.MaskedNode()
    if quantized(size):
      n_blocks = -(-size // block_size)
      return QuantizedMoment(codes=jnp.full((n_blocks, block_size), _zero_code(code), jnp.uint8),
                             absmax=jnp.zeros((n_blocks,), jnp.float32))
    return jnp.zeros(jnp.shape(p), jnp.float32)

  def init_fn(params):
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: init_leaf(p, SIGNED_MAP), params),
        nu=jax.tree.map(lambda p: init_leaf(p, UNSIGNED_MAP), params),
    )

  def update_fn(updates, state, params=None, *, finite=None, **extra_args):
    del params, extra_args  # an optax extra-args transformation ignores those it does not know
    count = guard.keep_unless(finite, optax.safe_increment(state.count), state.count)
    c1 = 1 - jnp.asarray(b1, jnp.float32)**count
    c2 = 1 - jnp.asarray(b2, jnp.float32)**count

    def adam(g, m32, v32):
      # optax.tree.update_moment / update_moment_per_elem_norm / scale_by_adam, same operation order.
      g32 = jnp.asarray(g, jnp.float32)
      m32 = (1 - b1) * g32 + b1 * m32
      v32 = (1 - b2) * (g32**2) + b2 * v32
      return (m32 / c1) / (jnp.sqrt(v32 / c2) + eps), m32, v32

    def quantized_step(g, m, v):
      shape = jnp.shape(g)
      u, m32, v32 = adam(g, dequantize_blockwise(m, SIGNED_MAP, shape), dequantize_blockwise(v, UNSIGNED_MAP, shape))
      return (u.astype(g.dtype), requantize_unless(finite, m32, m, SIGNED_MAP, block_size),
              requantize_unless(finite, v32, v, UNSIGNED_MAP, block_size))

    def leaf(g, m, v):
      if isinstance(m, optax.MaskedNode):
        return g, m, v
      if isinstance(m, QuantizedMoment):
        return _update_in_chunks(quantized_step, jnp.asarray(g), m, v, chunk_blocks)
      u, m32, v32 = adam(g, m, v)
      return u.astype(jnp.asarray(g).dtype), *guard.keep_unless(finite, (m32, v32), (m, v))

    flat_g, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    out = [leaf(g, m, v) for g, m, v in zip(flat_g, mus, nus)]
    if not out:
      return updates, ScaleByAdam8bitState(count=count, mu=state.mu, nu=state.nu)
    u, mu, nu = (treedef.unflatten(list(col)) for col in zip(*out))
    return u, ScaleByAdam8bitState(count=count, mu=mu, nu=nu)

  return guard.FiniteAware(init_fn, update_fn)


def _zero_code(code: np.ndarray) -> int:
  return int(np.flatnonzero(code == 0)[0])
