"""Q-GaLore's projections: INT4 bases (QuantizedBasis, basis_dtype="int4") and q_galore_adamw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_jax import (
    Basis,
    QuantizedBasis,
    dequantize_basis,
    galore,
    galore_adamw,
    q_galore_adamw,
    quantize_basis,
)
from galore_jax.optim.introspect import tree_bytes

RNG = np.random.default_rng(0)


def orthonormal(*shape):
  return jnp.asarray(np.linalg.qr(RNG.normal(size=shape))[0], jnp.float32)


@pytest.mark.parametrize("shape,group_size", [((64, 8), 256), ((3, 32, 4), 16), ((16, 2), 32)])
def test_round_trip_error_is_at_most_half_a_step(shape, group_size):
  q = jnp.asarray(RNG.normal(size=shape), jnp.float32)
  q = q.at[..., :, 0].set(jnp.abs(q[..., :, 0]) + 1.0)  # groups of one sign (the reference's clamped zero clips them)
  qb = quantize_basis(q, group_size)
  *batch, d, r = shape
  assert qb.codes.dtype == jnp.uint8 and qb.codes.shape == (*batch, r, d // 2)
  assert qb.scale.shape == qb.zero.shape == (*batch, d * r // group_size)
  back = dequantize_basis(qb)
  # the error of each entry against the scale of its group (columns laid out one after the other)
  err = np.abs(np.swapaxes(np.asarray(back - q), -1, -2)).reshape(*batch, -1, group_size)
  assert np.all(err <= np.asarray(qb.scale)[..., None] / 2 * (1 + 1e-5) + 1e-7)
  requantized = quantize_basis(back, group_size)  # the codes are what they hold
  np.testing.assert_array_equal(requantized.codes, qb.codes)


def test_codes_span_the_levels_of_each_group():
  qb = quantize_basis(orthonormal(64, 8), 256)
  codes = np.stack([np.asarray(qb.codes) & 15, np.asarray(qb.codes) >> 4], -1).reshape(2, 256)
  assert codes.min(axis=1).tolist() == [0, 0] and codes.max(axis=1).tolist() == [15, 15]


def _update_pair(g, **kw):
  params = {"attn": jnp.zeros_like(g)}
  outs = []
  for dtype in ("float32", "int4"):
    tx = galore(optax.identity(), rank=8, update_proj_gap=10, basis_dtype=dtype, **kw)
    u, state = tx.update({"attn": g}, tx.init(params))
    outs.append((np.asarray(u["attn"], np.float64), state))
  return outs


def test_update_error_against_fp32_bases_is_bounded():
  """``u = α Q Qᵀ G``: ‖Q̂Q̂ᵀ − QQᵀ‖₂ ≤ ‖E‖(2 + ‖E‖) with ‖E‖_F² ≤ Σ_g group·s_g²/4, so the update's error is
  at most ``α ‖G‖₂ ε (2 + ε)``, ε that bound."""
  g = jnp.asarray(RNG.normal(size=(64, 128)), jnp.float32)
  (u32, s32), (u4, s4) = _update_pair(g)
  qb = s4.bases["attn"].input
  eps = np.sqrt(np.sum(256 * np.asarray(qb.scale, np.float64) ** 2 / 4))
  bound = 0.25 * np.linalg.norm(np.asarray(g), 2) * eps * (2 + eps)
  assert np.linalg.norm(u4 - u32) <= bound
  assert np.linalg.norm(u4 - u32) / np.linalg.norm(u32) < 0.2


def test_q_galore_adamw_defaults_and_update_close_to_galore_adamw():
  g = {"attn": jnp.asarray(RNG.normal(size=(64, 128)), jnp.float32)}
  params = jax.tree.map(jnp.zeros_like, g)
  tx = q_galore_adamw(1e-2, rank=8)
  state = tx.init(params)
  assert isinstance(state[0].bases["attn"].input, QuantizedBasis) and state[0].schedule is not None
  u, _ = tx.update(g, state, params)
  ref = galore_adamw(1e-2, rank=8)
  u_ref, _ = ref.update(g, ref.init(params), params)
  rel = np.linalg.norm(u["attn"] - u_ref["attn"]) / np.linalg.norm(u_ref["attn"])
  assert 0 < rel < 0.5  # Adam's first step is sign-like, so the error is the subspace's, not scale/2


def test_state_bytes_are_codes_plus_scales_and_zeros():
  params = {"attn": {"q": jnp.zeros((64, 128))}, "mlp": {"up": jnp.zeros((4, 128, 32))}}
  tx = q_galore_adamw(1e-2, rank=8, basis_group_size=64)
  bases = tx.init(params)[0].bases
  # attn/q: input side d=64, r=8; mlp/up: 4 stacked, output side d=32, r=8
  expected = (64 * 8 // 2 + 2 * 4 * 64 * 8 // 64) + 4 * (32 * 8 // 2 + 2 * 4 * 32 * 8 // 64)
  assert tree_bytes(bases) == expected
  fp32 = galore_adamw(1e-2, rank=8).init(params)[0].bases
  assert tree_bytes(fp32) == 4 * (64 * 8 + 4 * 32 * 8)


def test_stacked_leaf_is_quantized_per_matrix():
  g = jnp.asarray(RNG.normal(size=(3, 32, 64)), jnp.float32)
  tx = galore(optax.identity(), rank=4, update_proj_gap=10, basis_dtype="int4", basis_group_size=32)
  _, state = tx.update({"attn": g}, tx.init({"attn": g}))
  qb = state.bases["attn"].input
  ref = galore(optax.identity(), rank=4, update_proj_gap=10)
  _, ref_state = ref.update({"attn": g}, ref.init({"attn": g}))
  for i in range(3):
    one = quantize_basis(ref_state.bases["attn"].input[i], 32)
    np.testing.assert_array_equal(qb.codes[i], one.codes)
    np.testing.assert_array_equal(qb.scale[i], one.scale)


def test_codes_kept_between_refreshes_and_replaced_at_one():
  tx = galore(optax.identity(), rank=4, update_proj_gap=2, basis_dtype="int4", basis_group_size=32)
  params = {"attn": jnp.zeros((32, 64))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for t in range(3):
    _, state = update({"attn": jnp.asarray(RNG.normal(size=(32, 64)), jnp.float32)}, state)
    seen.append(state.bases["attn"].input)
  assert all(np.array_equal(a, b) for a, b in zip(seen[0], seen[1]))  # step 1: no refresh, bit for bit
  assert not np.array_equal(seen[1].codes, seen[2].codes)  # step 2 refreshes


def test_dtypes():
  params = {"attn": jnp.zeros((32, 64), jnp.bfloat16)}
  tx = q_galore_adamw(1e-2, rank=4, basis_group_size=32)
  state = tx.init(params)
  qb = state[0].bases["attn"].input
  assert (qb.codes.dtype, qb.scale.dtype, qb.zero.dtype) == (jnp.uint8, jnp.float32, jnp.float32)
  u, state = tx.update({"attn": jnp.ones((32, 64), jnp.bfloat16)}, state, params)
  assert u["attn"].dtype == jnp.bfloat16
  assert dequantize_basis(qb, jnp.bfloat16).dtype == jnp.bfloat16


def test_group_size_must_divide_the_basis_naming_the_leaf():
  tx = q_galore_adamw(1e-2, rank=3)
  with pytest.raises(ValueError, match=r"'mlp/kernel'.*basis_group_size=256"):
    tx.init({"mlp": {"kernel": jnp.zeros((16, 32))}})
  with pytest.raises(ValueError, match="basis_group_size"):
    q_galore_adamw(1e-2, basis_group_size=3)
  with pytest.raises(ValueError, match="basis_group_size"):
    galore_adamw(1e-2, basis_group_size=0)


def test_identity_basis_quantizes_exactly():
  q = Basis(input=jnp.eye(32, 4), output=None).input
  np.testing.assert_array_equal(dequantize_basis(quantize_basis(q, 32)), q)
