"""The applicable checks of optax's contrib contract (optax/contrib/_common_test.py), plus orbax,
nnx.Optimizer, the state size of a Llama-7B-shaped tree, and every optimizer's GPU program (lowered on a CPU)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import gpu_solver_calls

import galore_jax
from galore_jax import GaLoreState, galore_adamw

ALL_MATRICES = lambda path, leaf: jnp.ndim(leaf) >= 2


def matrix_parabola():
  initial = {"w": jnp.zeros((4, 6)), "b": jnp.zeros(3)}
  final = {"w": jnp.arange(24.0).reshape(4, 6) / 10 - 1, "b": jnp.array([1.0, -1.0, 2.0])}
  objective = lambda p: sum(jnp.sum((p[k] - final[k]) ** 2) for k in p)
  return initial, final, objective


@pytest.mark.parametrize("rank", [4, 2])
def test_converges_on_a_matrix_parabola(rank):
  initial, final, objective = matrix_parabola()
  # With rank < min(m, n) each refresh moves a new subspace: more refreshes, still converges.
  opt = galore_adamw(1e-2, rank=rank, update_proj_gap=20, scale=1.0, target=ALL_MATRICES)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(objective)(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, opt.init(params)), length=5000)[0][0]

  params = run(initial)
  for key in final:
    np.testing.assert_allclose(params[key], final[key], atol=3e-2, rtol=3e-2)


def test_accepts_extra_args_and_does_not_recompile():
  initial, _, objective = matrix_parabola()
  opt = galore_adamw(1e-2, rank=2, target=ALL_MATRICES)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(objective)(params), state, params, unexpected_extra_arg=1)
    return optax.apply_updates(params, updates), state

  params, state = step(initial, opt.init(initial))
  compiled = step._cache_size()
  params, state = step(params, state)
  assert step._cache_size() == compiled
  assert jax.tree.structure(state) == jax.tree.structure(opt.init(initial))


def test_tree_map_params_maps_parameter_shaped_state_and_leaves_bases_alone():
  """optax.tree_map_params (used to derive a state's shardings from the parameters') maps only state leaves
  shaped like the parameters: here the trace in front of GaLore, never the bases or low-rank moments."""
  initial, _, objective = matrix_parabola()
  opt = optax.chain(optax.trace(0.9), galore_adamw(1e-2, rank=2, target=ALL_MATRICES, weight_decay=0.1))
  state = opt.update(jax.grad(objective)(initial), opt.init(initial), initial)[1]
  mapped = optax.tree_utils.tree_map_params(opt, jnp.zeros_like, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(state[0].trace))
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(mapped[0].trace))
  galore_before, galore_after = state[1][0], mapped[1][0]
  assert isinstance(galore_after, GaLoreState) and galore_before.bases
  chex.assert_trees_all_equal(galore_after, galore_before)


def test_inject_hyperparams_learning_rate_and_scale():
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.arange(6.0).reshape(2, 3), -jnp.arange(20.0).reshape(2, 5, 2)]
  kwargs = dict(learning_rate=1e-2, rank=1, update_proj_gap=5, scale=0.5, target=ALL_MATRICES)
  plain = galore_adamw(**kwargs)
  injected = optax.inject_hyperparams(galore_adamw, static_args=("rank", "update_proj_gap", "target"))(**kwargs)
  u_plain, s_plain = jax.jit(plain.update)(grads, plain.init(params), params)
  s_inj = injected.init(params)
  u_inj, s_inj = jax.jit(injected.update)(grads, s_inj, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u_inj, u_plain)
  # (an injected weight_decay is an array, so the injected chain also carries a zero decay stage)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_inj.inner_state[0], s_plain[0])
  # Changing the injected scale changes the projected update proportionally, nothing else.
  s_inj.hyperparams["scale"] = jnp.asarray(0.25)
  u_half, _ = jax.jit(injected.update)(grads, injected.init(params)._replace(hyperparams=s_inj.hyperparams), params)
  np.testing.assert_allclose(u_half[0], 0.5 * u_plain[0], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gradient_accumulation_with_multisteps(dtype):
  params = {"mlp": jnp.ones((4, 6), dtype), "norm": jnp.ones(3, dtype)}
  grads = jax.grad(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)))(params)
  opt = optax.MultiSteps(galore_adamw(1e-2, rank=2), every_k_schedule=4)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for _ in range(4):
    updates, state = update(grads, state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert jnp.any(updates["mlp"] != 0)  # the 4th micro-step applied an update
  # Accumulating 4 equal gradients = one step on that gradient.
  single = galore_adamw(1e-2, rank=2)
  expected, _ = single.update(grads, single.init(params), params)
  np.testing.assert_allclose(updates["mlp"].astype(jnp.float32), expected["mlp"].astype(jnp.float32), rtol=2e-2)


def test_partition_with_a_different_optimizer_for_embeddings():
  params = {"embed": jnp.ones((10, 4)), "attn": {"kernel": jnp.ones((4, 6))}}
  labels = {"embed": "sgd", "attn": {"kernel": "galore"}}
  opt = optax.partition({"sgd": optax.sgd(0.1), "galore": galore_adamw(1e-2, rank=2)}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  np.testing.assert_allclose(updates["embed"], -0.1)
  assert updates["attn"]["kernel"].shape == (4, 6)


def test_orbax_restore_gives_bit_identical_next_update(tmp_path):
  params = {"attn": {"kernel": jnp.ones((2, 6, 8))}, "mlp": {"kernel": jnp.ones((8, 6))}, "norm": jnp.ones(6)}
  opt = galore_adamw(optax.cosine_decay_schedule(1e-2, 100), rank=2, update_proj_gap=3, weight_decay=0.1)
  state = opt.init(params)
  step = jax.jit(opt.update)
  key = jax.random.key(0)
  for t in range(4):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, t), x.shape), params)
    _, state = step(grads, state, params)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt.init(params))
  restored = checkpointer.restore(tmp_path / "state", abstract)

  assert isinstance(restored[0], GaLoreState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for t in range(4, 8):  # across another refresh
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(key, t), x.shape), params)
    u_orig, state = step(grads, state, params)
    u_rest, restored = step(grads, restored, params)
    jax.tree.map(np.testing.assert_array_equal, u_rest, u_orig)


def test_nnx_optimizer_trains_a_small_model():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
      self.mlp = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.mlp(jax.nn.silu(self.attn(x)))

  model = Block(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, galore_adamw(3e-2, rank=2, update_proj_gap=5, scale=1.0), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jax.random.normal(jax.random.key(2), (16, 4))
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(50)]
  assert losses[-1] < 0.5 * losses[0]
  galore_state = jax.tree.leaves(optimizer.opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))[0]
  bases = jax.tree.leaves(galore_state.bases)
  assert sorted(galore_state.bases) == ["attn/kernel", "mlp/kernel"]
  assert sorted(b.shape for b in bases) == [(4, 2), (8, 2)]  # attn (8x8): input; mlp (8x4): output


LLAMA_7B = dict(vocab=32000, hidden=4096, inter=11008, layers=32)


def llama_shaped_tree(vocab, hidden, inter, layers, dtype=jnp.float32):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  layer = {
      "attn": {name: {"kernel": s(hidden, hidden)} for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "mlp": {"gate_proj": {"kernel": s(hidden, inter)}, "up_proj": {"kernel": s(hidden, inter)},
              "down_proj": {"kernel": s(inter, hidden)}},
      "input_norm": {"scale": s(hidden)},
      "post_attention_norm": {"scale": s(hidden)},
  }
  return {"embed": {"embedding": s(vocab, hidden)}, "layers": [layer] * layers, "final_norm": {"scale": s(hidden)},
          "lm_head": {"kernel": s(hidden, vocab)}}


def tree_bytes(tree):
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_llama_7b_state_bytes_match_closed_form(capsys):
  params = llama_shaped_tree(**LLAMA_7B)
  rank = 1024
  galore_bytes = tree_bytes(jax.eval_shape(galore_adamw(1e-2, rank=rank).init, params))
  adamw_bytes = tree_bytes(jax.eval_shape(optax.adamw(1e-2).init, params))

  h, i, L, v = LLAMA_7B["hidden"], LLAMA_7B["inter"], LLAMA_7B["layers"], LLAMA_7B["vocab"]
  matrices = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
  targeted = L * sum(rank * min(m, n) + 2 * rank * max(m, n) for m, n in matrices)
  rest = 2 * (2 * v * h + (2 * L + 1) * h)
  counts = 2 * 4  # GaLore's and Adam's int32 step counters
  assert galore_bytes == 4 * (targeted + rest) + counts
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert n_params == 6_738_415_616
  assert adamw_bytes == 4 * 2 * n_params + 4
  with capsys.disabled():
    print(f"\nLlama-7B fp32 optimizer state: galore_adamw(rank={rank}) {galore_bytes / 1e9:.2f} GB "
          f"vs optax.adamw {adamw_bytes / 1e9:.2f} GB ({galore_bytes / adamw_bytes:.1%})")
  assert galore_bytes < 0.35 * adamw_bytes


GPU_OPTIMIZERS = {
    "galore_adamw": galore_adamw, "galore_adamw+gram": functools.partial(galore_adamw, refresh="gram"),
    "galore_adamw+randomized": functools.partial(galore_adamw, refresh="randomized"),
    "galore_adamw_8bit": galore_jax.galore_adamw_8bit, "galore_adafactor": galore_jax.galore_adafactor,
    "fira_adamw": galore_jax.fira_adamw, "apollo_adamw": galore_jax.apollo_adamw,
    "apollo_mini": lambda lr, rank: galore_jax.apollo_mini(lr),
    "golore_adamw": functools.partial(galore_jax.golore_adamw, switch_step=2),
    "q_galore_adamw": functools.partial(galore_jax.q_galore_adamw, basis_group_size=16),
}


@pytest.mark.parametrize("name", list(GPU_OPTIMIZERS))
def test_every_optimizer_lowers_for_a_gpu_with_batched_solver_calls(name):
  """The update's StableHLO for CUDA, lowered here without a GPU (``jax.export``): a GPU session never finds it
  failing to lower, and its decompositions are cuSOLVER calls over the whole batch, not a per-matrix loop."""
  params = {"attn": {"stacked": jnp.zeros((3, 64, 48)), "wide": jnp.zeros((48, 64)), "norm": jnp.zeros(48)}}
  tx = GPU_OPTIMIZERS[name](1e-3, rank=8)
  targets = {target for target, _ in gpu_solver_calls(tx.update, params, tx.init(params), params)}
  assert all(t.startswith(("cusolver_", "cu_lu_")) for t in targets), targets
  assert bool(targets) == (not name.startswith("apollo")), targets  # APOLLO draws its projections: no solver
