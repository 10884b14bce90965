"""8-bit blockwise Adam (galore_jax.adam8bit) against bitsandbytes and fp32 Adam."""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import galore, galore_adamw_8bit, scale_by_adam_8bit
from galore_jax.optim import adam8bit as A


def _bnb():
  pytest.importorskip("torch")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return pytest.importorskip("bitsandbytes")


def _cos(a, b):
  a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- maps


@pytest.mark.parametrize("signed", [True, False])
def test_code_maps_equal_bitsandbytes(signed):
  bnb = _bnb()
  ref = bnb.functional.create_dynamic_map(signed=signed).numpy()
  mine = A.create_dynamic_map(signed)
  assert mine.dtype == np.float32 and mine.shape == (256,)
  np.testing.assert_array_equal(mine.view(np.uint32), ref.view(np.uint32))  # bit for bit
  assert np.all(np.diff(mine) > 0)  # sorted, no duplicates
  assert mine[-1] == 1.0 and 0.0 in mine
  assert (mine[0] < 0) == signed


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("block_size", [256, 2048])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_error_bounded_by_map_spacing(signed, block_size):
  code = A.SIGNED_MAP if signed else A.UNSIGNED_MAP
  rng = np.random.default_rng(0)
  n = 3 * block_size + 77  # a padded last block
  x = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
  if not signed:
    x = np.abs(x)
  q = A.quantize_blockwise(jnp.asarray(x), code, block_size)
  n_blocks = -(-n // block_size)
  assert q.codes.shape == (n_blocks, block_size) and q.codes.dtype == jnp.uint8
  assert q.absmax.shape == (n_blocks,) and q.absmax.dtype == jnp.float32
  padded = np.pad(x, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
  np.testing.assert_array_equal(np.asarray(q.absmax), np.abs(padded).max(1))  # absmax exact
  back = np.asarray(A.dequantize_blockwise(q, code, x.shape))
  assert back.shape == x.shape
  # Per element: |x - deq| <= absmax * (half the gap between the map values bracketing x/absmax).
  absmax = np.repeat(np.asarray(q.absmax), block_size)[:n]
  scaled = x / absmax
  hi = np.clip(np.searchsorted(code, scaled), 1, 255)
  half_gap = (code[hi] - code[hi - 1]) / 2
  assert np.all(np.abs(x - back) <= absmax * half_gap * (1 + 1e-5) + 1e-12)
  # The largest element of each block is exact (code 1.0 or -1.0 is not in the map: -0.993).
  top = np.abs(padded).argmax(1)
  deq_blocks = np.pad(back, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
  for b in range(n_blocks):
    if padded[b, top[b]] > 0:
      assert deq_blocks[b, top[b]] == padded[b, top[b]]


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_of_map_values_is_exact(signed):
  code = A.SIGNED_MAP if signed else A.UNSIGNED_MAP
  rng = np.random.default_rng(1)
  idx = rng.integers(0, 256, (5, 256)).astype(np.uint8)
  idx[:, 7] = 255  # each block contains the code 1.0, so its absmax is the scale itself
  scales = np.array([1.0, 0.5, 3e-3, 7.25, 1e-7], np.float32)
  q = A.QuantizedMoment(codes=jnp.asarray(idx), absmax=jnp.asarray(scales))
  x = A.dequantize_blockwise(q, code, (5 * 256,))
  again = A.quantize_blockwise(x, code, 256)
  np.testing.assert_array_equal(np.asarray(again.absmax), scales)
  np.testing.assert_array_equal(np.asarray(again.codes), idx)
  np.testing.assert_array_equal(np.asarray(A.dequantize_blockwise(again, code, (5 * 256,))), np.asarray(x))


@pytest.mark.parametrize("signed", [True, False])
def test_requantize_unless_keeps_the_old_codes_bit_for_bit(signed):
  """Not finite: the old codes and absmax come back exactly, whatever ``x`` holds (NaN here), because each map
  value is its own nearest code; finite: exactly :func:`quantize_blockwise`."""
  code = A.SIGNED_MAP if signed else A.UNSIGNED_MAP
  np.testing.assert_array_equal(np.asarray(A._nearest_code(code, jnp.asarray(code))), np.arange(256))
  rng = np.random.default_rng(2)
  old = A.QuantizedMoment(codes=jnp.asarray(rng.integers(0, 256, (4, 256)).astype(np.uint8)),
                          absmax=jnp.asarray([0.0, 1e-30, 0.5, 3e4], jnp.float32))
  x = jnp.asarray(rng.standard_normal(4 * 256 - 5), jnp.float32)
  kept = jax.jit(lambda finite, x, old: A.requantize_unless(finite, x, old, code, 256))(
      jnp.bool_(False), jnp.full_like(x, jnp.nan), old)
  for got, want in zip(kept, old):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  moved = A.requantize_unless(jnp.bool_(True), x, old, code, 256)
  for got, want in zip(moved, A.quantize_blockwise(x, code, 256)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_zeros_quantize_to_zero():
  q = A.quantize_blockwise(jnp.zeros((300,)), A.SIGNED_MAP, 256)
  np.testing.assert_array_equal(np.asarray(A.dequantize_blockwise(q, A.SIGNED_MAP, (300,))), 0.0)
  np.testing.assert_array_equal(np.asarray(q.absmax), 0.0)


def test_quantization_close_to_bitsandbytes_cpu():
  """bnb's CPU kernel is not exactly round-to-nearest: near-ties may take the other neighbour."""
  bnb = _bnb()
  import torch
  x = (np.random.default_rng(0).standard_normal(10000) * 3).astype(np.float32)
  for code, data in ((A.SIGNED_MAP, x), (A.UNSIGNED_MAP, np.abs(x))):
    ref, st = bnb.functional.quantize_blockwise(torch.tensor(data), code=torch.tensor(code), blocksize=256)
    mine = A.quantize_blockwise(jnp.asarray(data), code, 256)
    np.testing.assert_array_equal(np.asarray(mine.absmax), st.absmax.numpy())
    codes = np.asarray(mine.codes).reshape(-1)[:data.size].astype(int)
    diff = codes - ref.numpy().astype(int)
    assert np.all(np.abs(diff) <= 1) and np.mean(diff != 0) < 0.03


# ----------------------------------------------------------------------------- the optimizer


def _grads(shapes, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * (1 + i % 3)) for k, s in shapes.items()}
          for i in range(steps)]


def _run(tx, params, grads):
  state = tx.init(params)
  out = []
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    out.append(u)
  return out, state


def test_close_to_fp32_adam():
  shapes = {"w": (64, 128), "v": (5000,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = _grads(shapes, 20)
  ours, state = _run(scale_by_adam_8bit(), params, grads)
  ref, _ = _run(optax.scale_by_adam(), params, grads)
  assert isinstance(state.mu["w"], A.QuantizedMoment) and isinstance(state.nu["v"], A.QuantizedMoment)
  for u, r in zip(ours, ref):
    for k in shapes:
      assert _cos(u[k], r[k]) > 0.99


@pytest.mark.parametrize("block_size", [256, 2048])
def test_converges_on_quadratic(block_size):
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.standard_normal((64, 96)).astype(np.float32))
  curv = jnp.asarray(np.exp(rng.uniform(-2, 2, (64, 96))).astype(np.float32))
  loss = lambda w: 0.5 * jnp.sum(curv * (w - target)**2)

  def train(tx):
    w = jnp.zeros((64, 96))
    state = tx.init(w)

    @jax.jit
    def step(w, state):
      u, state = tx.update(jax.grad(loss)(w), state, w)
      return optax.apply_updates(w, u), state

    for _ in range(400):
      w, state = step(w, state)
    return float(loss(w))

  start = float(loss(jnp.zeros((64, 96))))
  eight = train(optax.chain(scale_by_adam_8bit(block_size=block_size), optax.scale(-0.05)))
  fp32 = train(optax.chain(optax.scale_by_adam(), optax.scale(-0.05)))
  assert eight < 1e-3 * start
  assert eight < 10 * fp32 + 1e-3 * start


def test_small_leaves_are_bit_identical_to_fp32_adam():
  shapes = {"a": (10, 10), "b": (50,), "c": (63, 65)}  # all < 4096 elements
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = _grads(shapes, 10)
  ours, state = _run(scale_by_adam_8bit(b1=0.8, b2=0.99, eps=1e-6), params, grads)
  ref, ref_state = _run(optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6), params, grads)
  for u, r in zip(ours, ref):
    for k in shapes:
      np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(r[k]))
  for k in shapes:
    np.testing.assert_array_equal(np.asarray(state.mu[k]), np.asarray(ref_state.mu[k]))
    np.testing.assert_array_equal(np.asarray(state.nu[k]), np.asarray(ref_state.nu[k]))


def test_min_8bit_size_threshold_and_no_zero_size_arrays():
  params = {"below": jnp.zeros((4095,)), "at": jnp.zeros((64, 64)), "empty": jnp.zeros((0, 8)),
            "tiny": jnp.zeros((3,))}
  state = scale_by_adam_8bit().init(params)
  assert isinstance(state.mu["below"], jax.Array) and state.mu["below"].dtype == jnp.float32
  assert isinstance(state.mu["at"], A.QuantizedMoment)
  assert isinstance(state.mu["empty"], optax.MaskedNode)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  tiny = scale_by_adam_8bit(min_8bit_size=0).init(params)
  assert tiny.mu["tiny"].codes.shape == (1, 256)  # padded to one whole block
  assert all(x.size > 0 for x in jax.tree.leaves(tiny))
  u, _ = scale_by_adam_8bit().update(jax.tree.map(jnp.ones_like, params), state)
  assert u["empty"].shape == (0, 8)


@pytest.mark.parametrize("block_size", [256, 2048])
def test_state_bytes_exact(block_size):
  params = {"w": jax.ShapeDtypeStruct((4096, 11008), jnp.float32), "b": jax.ShapeDtypeStruct((11008,), jnp.float32),
            "odd": jax.ShapeDtypeStruct((4097, 3), jnp.float32)}
  state = jax.eval_shape(scale_by_adam_8bit(block_size=block_size).init, params)
  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  n = 4096 * 11008
  blocks = n // block_size
  assert nbytes(state.mu["w"]) == nbytes(state.nu["w"]) == n + 4 * blocks
  odd_blocks = -(-4097 * 3 // block_size)
  assert nbytes(state.mu["odd"]) == odd_blocks * (block_size + 4)
  b_blocks = -(-11008 // block_size)  # 43 (exact) or 6 (padded: 12288 codes)
  assert nbytes(state.mu["b"]) == b_blocks * (block_size + 4)
  assert nbytes(state) == 4 + 2 * (n + 4 * blocks + (odd_blocks + b_blocks) * (block_size + 4))
  fp32 = jax.eval_shape(optax.scale_by_adam().init, params)
  assert nbytes(fp32) / nbytes(state) > 3.9


def test_jit_compiles_once_and_structure_is_stable():
  tx = scale_by_adam_8bit()
  params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros((7,))}
  state = tx.init(params)
  structure = jax.tree.structure(state)
  avals = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  update = jax.jit(tx.update)
  for g in _grads({"w": (64, 128), "b": (7,)}, 4):
    _, state = update(g, state)
    assert jax.tree.structure(state) == structure
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == avals
  assert update._cache_size() == 1
  assert int(state.count) == 4


def test_bad_block_size():
  with pytest.raises(ValueError):
    scale_by_adam_8bit(block_size=512)


@pytest.mark.parametrize("chunk_size", [0, 255, 256.0, True, -1])
def test_bad_chunk_size(chunk_size):
  with pytest.raises(ValueError, match="chunk_size"):
    scale_by_adam_8bit(block_size=256, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- chunked updates


def _run_leaf(tx, size, dtype, steps=4, skip_at=2):
  """``steps`` jitted updates of one leaf of ``size`` elements; step ``skip_at`` has a NaN and is skipped."""
  state = tx.init({"w": jnp.zeros(size, dtype)})
  update = jax.jit(lambda g, s, ok: tx.update(g, s, finite=ok))
  out = []
  for t in range(steps):
    g = {"w": jax.random.normal(jax.random.key(t), (size,), dtype) * (1 + t)}
    if t == skip_at:
      g = {"w": g["w"].at[size // 2].set(jnp.nan)}
    u, state = update(g, state, jnp.asarray(t != skip_at))
    out.append((u["w"], state))
  return out


@pytest.mark.parametrize("size,block_size,chunk_size", [
    (256 * 8, 256, 512),  # 4 chunks that tile the leaf
    (256 * 7 + 13, 256, 512),  # 3 chunks, then a tail with the zero-padded last block
    (256 * 11, 256, 1024),  # 11 whole blocks: no divisor in [2, 4], 2 chunks of 4 and a tail of 3
    (2048 * 5 + 1, 2048, 2048),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_update_matches_the_whole_leaf(size, block_size, chunk_size, dtype):
  """The chunk loop runs the whole leaf's operations block by block; XLA fuses them differently inside the loop,
  so the update may differ in the last bits of fp32 and a code, rarely, by one step. A skipped step keeps the
  state bit for bit in both."""
  whole = _run_leaf(scale_by_adam_8bit(block_size=block_size, min_8bit_size=1, chunk_size=None), size, dtype)
  chunked = _run_leaf(scale_by_adam_8bit(block_size=block_size, min_8bit_size=1, chunk_size=chunk_size), size, dtype)
  assert chunked[0][1].mu["w"].codes.shape == (-(-size // block_size), block_size)
  for t, ((u_w, s_w), (u_c, s_c)) in enumerate(zip(whole, chunked)):
    rtol = 1e-6 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(np.asarray(u_c, np.float32), np.asarray(u_w, np.float32), rtol=rtol, atol=1e-30)
    for q_w, q_c in ((s_w.mu["w"], s_c.mu["w"]), (s_w.nu["w"], s_c.nu["w"])):
      np.testing.assert_allclose(q_c.absmax, q_w.absmax, rtol=1e-6)
      steps = np.abs(np.asarray(q_c.codes, np.int32) - np.asarray(q_w.codes, np.int32))
      assert steps.max() <= 1 and np.mean(steps) < 1e-3
    if t == 2:  # the skipped step
      chex.assert_trees_all_equal(s_c.mu, chunked[1][1].mu)
      chex.assert_trees_all_equal(s_c.nu, chunked[1][1].nu)


def test_even_chunk_tiles_the_whole_blocks_where_it_can():
  assert A._even_chunk(512000, 16384) == 16000  # a 32000x4096 embedding in blocks of 256
  assert A._even_chunk(44032, 16384) == 11008  # 1024x11008
  assert A._even_chunk(8, 2) == 2
  assert A._even_chunk(11, 4) == 4  # 11 is prime: a tail after the chunks


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_chunked_update_bounds_the_temporaries(dtype, monkeypatch):
  """A 32000x4096 leaf (Llama's embedding) updated whole holds fp32 copies of the leaf as XLA temporaries; in
  chunks of 2^22 elements, a few chunks' worth. On CPU a bf16 leaf's loop carries its bits, one leaf-sized
  copy more; elsewhere (``carry`` of the gradient's dtype, also compiled here) it does not. Compiled on
  abstract shapes: nothing is allocated."""
  shape, chunk_size = (32000, 4096), 1 << 22

  def temporaries(update, state):
    grads = {"w": jax.ShapeDtypeStruct(shape, dtype)}
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(grads, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  def optimizer(chunk_size):
    tx = scale_by_adam_8bit(chunk_size=chunk_size)
    return tx.update, jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(shape, dtype)})

  leaf_fp32, leaf = math.prod(shape) * 4, math.prod(shape) * jnp.dtype(dtype).itemsize
  chunk_fp32 = chunk_size * 4
  whole, chunked = temporaries(*optimizer(None)), temporaries(*optimizer(chunk_size))
  assert whole >= 4 * leaf_fp32
  assert chunked <= 8 * chunk_fp32 + (leaf if dtype == jnp.bfloat16 else 0)
  # the branch a GPU lowers
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, default, **per_platform: default(*args))
  assert temporaries(*optimizer(chunk_size)) <= 8 * chunk_fp32


# ----------------------------------------------------------------------------- inside galore


@pytest.mark.parametrize("min_8bit_size", [4096, 1024])
def test_inside_galore(min_8bit_size):
  shapes = {"mlp": (64, 256), "norm": (256,)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  grads = _grads(shapes, 12)
  ours, state = _run(galore(scale_by_adam_8bit(min_8bit_size=min_8bit_size), rank=8, update_proj_gap=5), params, grads)
  ref, _ = _run(galore(optax.scale_by_adam(), rank=8, update_proj_gap=5), params, grads)
  mu = state.inner_state.mu["mlp"]
  if min_8bit_size == 1024:  # low-rank (8, 256) = 2048 elements: quantized
    assert isinstance(mu, A.QuantizedMoment) and mu.codes.shape == (8, 256)
    for u, r in zip(ours, ref):
      assert _cos(u["mlp"], r["mlp"]) > 0.99
  else:  # fp32: identical to galore(optax.scale_by_adam())
    assert mu.shape == (8, 256)
    for u, r in zip(ours, ref):
      np.testing.assert_array_equal(np.asarray(u["mlp"]), np.asarray(r["mlp"]))
  for u in ours:
    assert u["mlp"].shape == (64, 256) and np.all(np.isfinite(np.asarray(u["mlp"])))


def _dequantized(moment, code, shape):
  return np.asarray(A.dequantize_blockwise(moment, code, shape) if isinstance(moment, A.QuantizedMoment) else moment)


@pytest.mark.parametrize("on_refresh", ["reset", "project"])
def test_on_refresh_carries_quantized_moments_like_fp32_ones(on_refresh):
  """8-bit moments are dequantized, reset or rotated, and requantized: after the refresh at step 3 they
  match the fp32-moment run to 8-bit precision, and differ from keeping them (the op is not a no-op)."""
  shapes = {"mlp": (64, 256)}
  params = {"mlp": jnp.zeros((64, 256))}
  grads = _grads(shapes, 4)
  kw = dict(rank=8, update_proj_gap=3)
  run = lambda min_size, mode: _run(galore(scale_by_adam_8bit(min_8bit_size=min_size), on_refresh=mode, **kw),
                                    params, grads)
  ours, state = run(1024, on_refresh)  # low-rank (8, 256): quantized
  fp32, fp32_state = run(1 << 30, on_refresh)  # same arithmetic, fp32 moments
  keep, keep_state = run(1024, "keep")
  assert isinstance(state.inner_state.mu["mlp"], A.QuantizedMoment)
  for name, code in (("mu", A.SIGNED_MAP), ("nu", A.UNSIGNED_MAP)):
    got = _dequantized(getattr(state.inner_state, name)["mlp"], code, (8, 256))
    want = np.asarray(getattr(fp32_state.inner_state, name)["mlp"])
    kept = _dequantized(getattr(keep_state.inner_state, name)["mlp"], code, (8, 256))
    assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want), name  # 8-bit map: ~1% per block
    assert np.linalg.norm(kept - want) > 0.1 * np.linalg.norm(want), name
  for u, r in zip(ours, fp32):
    assert _cos(u["mlp"], r["mlp"]) > 0.99
  assert _cos(ours[3]["mlp"], keep[3]["mlp"]) < 0.99


def test_galore_adamw_8bit_weight_decay_placement():
  lr, wd = 0.1, 0.5
  params = {"mlp": jnp.ones((16, 32)), "norm": jnp.ones((32,))}
  grads = _grads({"mlp": (16, 32), "norm": (32,)}, 1)[0]
  tx = galore_adamw_8bit(lr, rank=4, weight_decay=wd)
  plain = galore_adamw_8bit(lr, rank=4)
  u, _ = tx.update(grads, tx.init(params), params)
  u0, _ = plain.update(grads, plain.init(params), params)
  # non-targeted: bnb decays the weight before the step: p(1 - lr wd) + u0
  np.testing.assert_allclose(np.asarray(u["norm"]), np.asarray(u0["norm"] - lr * wd * params["norm"]), rtol=1e-6)
  # targeted: the reference decays the updated weight: (p + u0)(1 - lr wd) - p
  np.testing.assert_allclose(np.asarray(u["mlp"]), np.asarray(u0["mlp"] - lr * wd * (params["mlp"] + u0["mlp"])),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bitsandbytes parity


def test_parity_with_bitsandbytes_adam8bit_cpu():
  """bnb 0.50 runs its 8-bit blockwise optimizers on CPU (backends/cpu/ops.py, block size 256)."""
  bnb = _bnb()
  import torch
  lr, steps = 1e-3, 15
  shapes = {"w": (64, 128), "b": (100,)}
  grads = _grads(shapes, steps, seed=3)
  init = {k: np.zeros(s, np.float32) for k, s in shapes.items()}  # small weights: deltas measured exactly
  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = bnb.optim.Adam8bit(list(tp.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8)
  tx = optax.chain(scale_by_adam_8bit(), optax.scale(-lr))
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, g in enumerate(grads):
    before = {k: p.detach().clone().numpy() for k, p in tp.items()}
    for k, p in tp.items():
      p.grad = torch.tensor(np.asarray(g[k]))
    opt.step()
    ref = {k: p.detach().numpy() - before[k] for k, p in tp.items()}
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    # fp32 path (< 4096 elements): same formula, rounding-level differences only.
    np.testing.assert_allclose(np.asarray(u["b"]), ref["b"], rtol=1e-4, atol=1e-9)
    # 8-bit path: the moments' codes may differ by one step on near-ties (bnb is not exactly nearest).
    assert _cos(u["w"], ref["w"]) > 0.999
    assert np.median(np.abs(np.asarray(u["w"]) - ref["w"]) / np.abs(ref["w"])) < 1e-3
    if i == 0:  # step 1: identical moments before any quantization
      st = opt.state[tp["w"]]
      np.testing.assert_array_equal(np.asarray(state[0].mu["w"].absmax), st["absmax1"].numpy())
      # v: optax's (1-b2)*(g**2) vs torch's addcmul order: 1-ulp differences.
      np.testing.assert_allclose(np.asarray(state[0].nu["w"].absmax), st["absmax2"].numpy(), rtol=3e-7)
