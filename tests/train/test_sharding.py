"""Data parallel + FSDP on 8 CPU devices: sharded steps equal the single-device step, shardings are
stable, checkpoints restore onto other meshes, and the optimizer state per device shrinks with fsdp."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.base import base
from galore_jax import galore_adamw
from galore_jax.train import checkpoint, config, sharding, steps
from galore_jax.models import llama

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets 8 CPU devices)")

CFG = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, max_position_embeddings=16)
MIN_SIZE = 256  # split the tiny model's kernels and embeddings, keep its norm scales replicated
BATCH, GRAD_ACCUM, LR = 16, 2, 1e-3


def make_config(name):
  """``name``: an optimizer name, or ``NAME+REFRESH`` for another refresh method (``galore_adamw+gram``)."""
  name, _, refresh = name.partition("+")
  cfg = base()
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = LR, 0, 10
  cfg.optimizer.name, cfg.optimizer.rank, cfg.optimizer.update_proj_gap = name, 4, 2  # refreshes on steps 0, 2
  cfg.optimizer.golore_switch_step = 2  # golore_adamw: an SVD refresh, then random ones
  cfg.optimizer.basis_group_size = 16  # q_galore_adamw: int4 groups that fit the tiny bases
  cfg.optimizer.refresh = refresh or cfg.optimizer.refresh
  return cfg


def batch(seed):
  tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (BATCH, 17), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((BATCH, 16), np.float32)}


def model_and_params():
  model = llama.Llama(CFG, rngs=nnx.Rngs(0))
  return nnx.graphdef(model), jax.device_get(steps.params_of(model))


def run(name, n_steps, layout=None, start=None, first=0, on_step=None):
  """``n_steps`` train steps on batches ``first, first + 1, ...`` from ``start`` (params, state; default: a fresh
  init) → (host params and state, metrics, the live arrays); ``on_step(t, params, state)`` after each step."""
  graphdef, params = model_and_params()
  tx = config.build_optimizer(make_config(name))
  step_fns = steps.make_steps(graphdef, tx, grad_accum=GRAD_ACCUM, packed=False, report_overlap=True, layout=layout)
  params, state = start if start is not None else (params, tx.init(params))
  if layout is not None:
    params, state = jax.device_put(params, layout.params), jax.device_put(state, layout.opt_state)
  history = []
  for t in range(first, first + n_steps):
    b = batch(t) if layout is None else sharding.shard_batch(batch(t), layout.mesh)
    params, state, metrics = step_fns.train(params, state, b)
    history.append(jax.device_get(metrics))
    if on_step is not None:
      on_step(t, params, state)
  return jax.device_get((params, state)), history, (params, state)


_REFERENCE = {}


def reference(name):
  if name not in _REFERENCE:
    _REFERENCE[name] = run(name, 3)[:2]
  return _REFERENCE[name]


def layout_for(name, data, fsdp, axis_types="auto", devices=None):
  mesh = sharding.make_mesh(data, fsdp, axis_types, devices=devices)
  return sharding.Layout.build(mesh, config.build_optimizer(make_config(name)), model_and_params()[1], MIN_SIZE)


def assert_placed(tree, shardings):
  """Every array of ``tree`` has exactly the NamedSharding of ``shardings`` (and, under Explicit axes, its type)."""
  arrays = jax.tree.leaves(tree)
  expected = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(arrays) == len(expected)
  padded = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))  # P() = P(None, None) on a matrix
  for x, s in zip(arrays, expected):
    assert x.sharding.mesh == s.mesh, (x.sharding, s)
    assert padded(x.sharding.spec, x.ndim) == padded(s.spec, x.ndim), (x.shape, x.sharding, s)
    if sharding.is_explicit(s.mesh):
      assert padded(jax.typeof(x).sharding.spec, x.ndim) == padded(s.spec, x.ndim), (jax.typeof(x), s.spec)


# ----------------------------------------------------------------------------- rules


def test_make_mesh_resolves_minus_one_and_refuses_sizes_that_do_not_fit():
  assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh(1, -1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(sharding.MeshError, match="mesh.fsdp=3 does not divide the 8 devices"):
    sharding.make_mesh(-1, 3)
  with pytest.raises(sharding.MeshError, match=r"mesh.data=2 x mesh.fsdp=2 = 4 devices, but there are 8"):
    sharding.make_mesh(2, 2)
  with pytest.raises(sharding.MeshError, match="both -1"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(sharding.MeshError, match="mesh.axis_types"):
    sharding.make_mesh(1, -1, "manual")


@pytest.mark.parametrize("shape,fsdp,expected", [
    ((64, 128), 4, P(None, "fsdp")),  # the larger axis
    ((128, 64), 4, P("fsdp", None)),
    ((64, 64), 4, P(None, "fsdp")),  # square: the output axis (left unprojected by GaLore's std rule)
    ((3, 64, 96), 8, P(None, None, "fsdp")),  # stacked layers: the leading axis replicated
    ((100, 64), 8, P(None, "fsdp")),  # the larger axis is not divisible: the other one
    ((100, 60), 8, P()),  # neither
    ((64,), 8, P()),  # 1-D
    ((16, 8), 8, P()),  # fewer than min_size elements
    ((256, 64), 1, P()),  # fsdp 1: nothing to split
])
def test_param_spec_rule(shape, fsdp, expected):
  assert sharding.param_spec(shape, fsdp, min_size=MIN_SIZE) == expected


def test_galore_state_specs_follow_the_parameters_axes():
  """Bases take the spec of the parameter axis they span, low-rank moments that of their unprojected axis."""
  params = {"mlp": {"kernel": jnp.zeros((64, 128))}, "attn": {"kernel": jnp.zeros((128, 64))},
            "embed": jnp.zeros((256, 64)), "norm": jnp.zeros(64)}
  tx = galore_adamw(1e-3, rank=4, update_proj_gap=2)
  mesh = sharding.make_mesh(2, 4)
  layout = sharding.Layout.build(mesh, tx, params, MIN_SIZE)
  galore_state = sharding.spec_tree(layout.opt_state)[0]
  # mlp [64, 128] split on its output axis; std projects the input side: Q [64, 4], moments [4, 128].
  assert galore_state.bases["mlp/kernel"] == (P(), None)
  # attn [128, 64] split on its input axis; std projects the output side: Q [64, 4], moments [128, 4].
  assert galore_state.bases["attn/kernel"] == (None, P())
  adam = galore_state.inner_state
  for moments in (adam.mu, adam.nu):
    assert moments == {"mlp": {"kernel": P(None, "fsdp")}, "attn": {"kernel": P("fsdp", None)},
                       "embed": P("fsdp", None), "norm": P()}
  assert galore_state.count == P() and adam.count == P()
  # proj_type="reverse_std" projects the split axis instead: the bases are split and the moments are not.
  tx = galore_adamw(1e-3, rank=4, update_proj_gap=2, proj_type="reverse_std")
  galore_state = sharding.spec_tree(sharding.Layout.build(mesh, tx, params, MIN_SIZE).opt_state)[0]
  assert galore_state.bases["mlp/kernel"] == (None, P("fsdp", None))
  assert galore_state.inner_state.mu["mlp"]["kernel"] == P()


def test_indivisible_state_axes_are_replicated():
  """A rank of 6 on 4 devices: bases [m, 6] and moments [6, n] split only on axes that 4 divides."""
  params = {"mlp": {"kernel": jnp.zeros((6, 128))}}
  tx = galore_adamw(1e-3, rank=6, update_proj_gap=2, proj_type="full")
  specs = sharding.spec_tree(sharding.Layout.build(sharding.make_mesh(2, 4), tx, params, 0).opt_state)[0]
  assert specs.bases["mlp/kernel"] == (P(), P("fsdp", None))
  assert specs.inner_state.mu["mlp"]["kernel"] == P()  # [6, 6]


@pytest.mark.parametrize("overrides,needle", [
    ({"mesh.data": -1, "mesh.fsdp": 3}, "mesh.fsdp=3 does not divide"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, "mesh.data=2 x mesh.fsdp=2"),
    ({"train.batch_size": 12}, "12 sequences per micro-batch does not split over mesh.data x mesh.fsdp = 8"),
    ({"eval.batch_size": 4}, "eval.batch_size 4"),
    ({"train.layerwise": True}, "train.layerwise=True runs on one device"),
    ({"mesh.axis_types": "manual"}, "mesh.axis_types"),
])
def test_validate_refuses_meshes_that_cannot_work(overrides, needle):
  cfg = make_config("galore_adamw")
  cfg.model.preset, cfg.data.seq_len, cfg.train.batch_size = "llama_9m", 16, 16
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  with pytest.raises(config.ConfigError, match=needle):
    config.validate(cfg)


# ----------------------------------------------------------------------------- steps


# galore_adamw+gram: the Gram refresh's batched eigh once hung the 8-device step (tests/optim/test_linalg.py)
@pytest.mark.parametrize("name", ["galore_adamw", "adamw", "galore_adamw+gram"])
@pytest.mark.parametrize("data,fsdp,axis_types", [(8, 1, "auto"), (1, 8, "explicit"), (2, 4, "auto")])
def test_sharded_steps_equal_the_single_device_steps(name, data, fsdp, axis_types):
  """Three steps (GaLore refreshes on the first and the third) match one device; shardings never change."""
  expected, expected_metrics = reference(name)
  layout = layout_for(name, data, fsdp, axis_types)
  actual, metrics, live = run(name, 3, layout)
  assert_placed(live[0], layout.params)
  assert_placed(live[1], layout.opt_state)
  for m, e in zip(metrics, expected_metrics):
    np.testing.assert_allclose(m["loss"], e["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], e["grad_norm"], rtol=1e-4)
  if name.startswith("galore"):
    assert np.isfinite(metrics[2]["subspace_overlap"])  # the third step refreshed
    np.testing.assert_allclose(metrics[2]["subspace_overlap"], expected_metrics[2]["subspace_overlap"], rtol=1e-4)
  chex.assert_trees_all_close(actual[0], expected[0], rtol=1e-4, atol=2e-5)  # lr 1e-3: updates are ~1e-3 per step
  chex.assert_trees_all_close(actual[1], expected[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["fira_adamw", "apollo_mini", "golore_adamw", "q_galore_adamw"])
def test_family_sharded_steps_equal_the_single_device_steps(name):
  """Fira, APOLLO-Mini (rank-1 random projections), GoLore (random bases from step 2) and Q-GaLore (int4 bases)
  on the Explicit 1x8 mesh: the single-device steps; limiter norms (one number per matrix) and int4 codes are
  replicated."""
  expected, expected_metrics = reference(name)
  layout = layout_for(name, 1, 8, "explicit")
  actual, metrics, live = run(name, 3, layout)
  assert_placed(live[0], layout.params)
  assert_placed(live[1], layout.opt_state)
  rule_specs = jax.tree.leaves(sharding.spec_tree(layout.opt_state)[0].rule_state, is_leaf=lambda x: isinstance(x, P))
  assert all(spec == P() for spec in rule_specs) and bool(rule_specs) == (name in ("fira_adamw", "apollo_mini"))
  if name == "q_galore_adamw":  # int4 codes, scales and zero points: replicated
    bases = jax.tree.leaves(sharding.spec_tree(layout.opt_state)[0].bases, is_leaf=lambda x: isinstance(x, P))
    assert bases and all(spec == P() for spec in bases)
  for m, e in zip(metrics, expected_metrics):
    np.testing.assert_allclose(m["loss"], e["loss"], rtol=1e-5)
  chex.assert_trees_all_close(actual[0], expected[0], rtol=1e-4, atol=2e-5)
  chex.assert_trees_all_close(actual[1], expected[1], rtol=1e-3, atol=1e-5)


def test_galore_update_under_explicit_axes_without_auto_axes():
  """tx.update on split gradients under an Explicit mesh: the refresh gathers its operands (the SVD cannot
  take a split matrix), the projections keep legal types, and the result is the single-device one."""
  params = {"mlp": {"kernel": jnp.zeros((64, 128))}, "attn": {"kernel": jnp.zeros((128, 64))}, "norm": jnp.zeros(64)}
  tx = galore_adamw(1e-2, rank=4, update_proj_gap=2)
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(3)]
  layout = sharding.Layout.build(sharding.make_mesh(2, 4, "explicit"), tx, params, MIN_SIZE)
  update = jax.jit(tx.update)
  state = tx.init(params)
  with sharding.mesh_context(layout.mesh):
    split_state = jax.device_put(state, layout.opt_state)
    for g in grads:
      expected, state = jax.jit(tx.update)(g, state)
      actual, split_state = update(jax.device_put(g, layout.params), split_state)
      assert_placed(actual, layout.params)
      assert_placed(split_state, layout.opt_state)
      chex.assert_trees_all_close(jax.device_get(actual), jax.device_get(expected), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_saved_on_2x4_restores_on_1x4_and_on_one_device(tmp_path):
  name = "galore_adamw"
  ckpts = checkpoint.Checkpoints(str(tmp_path), every=1, keep=1, async_save=False)
  save_after_two = lambda t, params, state: t == 1 and ckpts.save(2, params, state, {"step": 2}, force=True)
  (expected, metrics, _) = run(name, 3, layout_for(name, 2, 4), on_step=save_after_two)  # step 3 refreshes
  ckpts.wait()
  expected_metrics = metrics[2:]

  tx = config.build_optimizer(make_config(name))
  params = model_and_params()[1]
  on_four = layout_for(name, 1, 4, "explicit", jax.devices()[:4])
  for layout in (on_four, layout_for(name, 1, 1, devices=jax.devices()[:1])):
    abstract_params = sharding.with_shardings(jax.eval_shape(lambda: params), layout.params)
    abstract_state = sharding.with_shardings(jax.eval_shape(tx.init, params), layout.opt_state)
    restored_params, restored_state, meta = ckpts.restore(2, abstract_params, abstract_state)
    assert meta == {"step": 2}
    assert_placed(restored_params, layout.params)
    assert_placed(restored_state, layout.opt_state)
    assert int(restored_state[0].count) == 2
    saved_params = jax.device_get(restored_params)  # the step donates them
    actual, metrics, _ = run(name, 1, layout, start=(restored_params, restored_state), first=2)
    np.testing.assert_allclose(metrics[0]["loss"], expected_metrics[0]["loss"], rtol=1e-5)
    assert np.isfinite(metrics[0]["subspace_overlap"])
    chex.assert_trees_all_close(actual, expected, rtol=1e-3, atol=2e-5)
  # A target without shardings (eval.py, the layerwise path) restores onto the default device.
  plain, _ = ckpts.restore_params(2, jax.eval_shape(lambda: params))
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(plain))
  chex.assert_trees_all_close(jax.device_get(plain), saved_params, rtol=0, atol=0)
  ckpts.close()


# ----------------------------------------------------------------------------- memory


def test_optimizer_state_bytes_per_device_shrink_with_fsdp():
  """Computed from the shardings, and equal to what device 0 really holds after a split init."""
  tx = config.build_optimizer(make_config("galore_adamw"))
  params = model_and_params()[1]
  abstract_state = jax.eval_shape(tx.init, params)
  per_device = {}
  for fsdp in (1, 2, 4, 8):
    layout = layout_for("galore_adamw", 8 // fsdp, fsdp)
    per_device[fsdp] = sharding.bytes_per_device(abstract_state, layout.opt_state)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  assert per_device[1] == total
  assert per_device[1] > per_device[2] > per_device[4] > per_device[8], per_device
  # The split leaves (moments of kernels and embeddings) dominate this model's state: 8 devices hold < 1/4 each.
  assert per_device[8] < total / 4, per_device
  state = layout.init_opt_state(tx, jax.device_put(params, layout.params))
  device0 = jax.devices()[0]
  held = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.device == device0)
  assert held == per_device[8]
