"""Layerwise updates equal the whole-tree step: with gradient accumulation, global-norm clipping and refreshes,
with unrolled layers (a Python loop) and stacked ones (a reverse scan updating each layer's slice in place)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.base import base
from galore_jax import apollo_adamw, fira_adamw, galore_adamw, galore_adamw_8bit, golore_adamw, q_galore_adamw
from galore_jax.train import config, layerwise, steps
from galore_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
LAYOUTS = pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "stacked"])


def layout(cfg, stacked):
  return cfg.replace(scan_layers=stacked)


def batch(seed, b=4, s=16, packed=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, s + 1), dtype=np.int32)
  mask = (rng.random((b, s)) > 0.1).astype(np.float32)
  segments = np.where(np.arange(s) < s // 2, 1, 2)[None].repeat(b, 0).astype(np.int32) if packed else np.ones((b, s),
                                                                                                              np.int32)
  positions = llama.segment_positions(jnp.asarray(segments))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask, "segment_ids": segments,
          "positions": np.asarray(positions)}


def run(tx, *, layerwise_updates, grad_accum, n_steps=4, cfg=CFG, packed=False):
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  step = steps.make_steps(graphdef, tx, grad_accum=grad_accum, packed=packed, report_overlap=True,
                             layerwise_updates=layerwise_updates).train
  state = tx.init(params)
  history = []
  for t in range(n_steps):
    params, state, m = step(params, state, batch(t, packed=packed))
    history.append(jax.device_get(m))
  return params, history


def initial_params(cfg=CFG):
  return steps.params_of(llama.Llama(cfg, rngs=nnx.Rngs(0)))


def assert_close_trees(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


# The two steps compute the same gradient with sums in another order (the layer-by-layer vjps against the
# whole-model vjp), so they agree to fp32 reassociation: about 2e-7 of a leaf's largest gradient entry.
# Adam then divides every entry by its own RMS: an entry whose contributions nearly cancel (measured: gradient
# entries with 1e-4 relative reassociation error) gets a full-size update carrying that relative error, so
# an elementwise bound on the weights is one ulp from red on some machines (2.0e-6 seen against 2e-6).
# Hence: gradients elementwise against their own scale, weights norm-wise against how far they moved.
GRAD_RTOL = 1e-5  # of max|g| per leaf: 50x the measured reassociation; a lost micro-batch is O(1)
MOVE_RTOL = 1e-3  # of the leaf's movement, norm-wise: 45x the measured 2.2e-5; any mis-applied update is O(1)


def assert_same_training(swept, reference, initial):
  """Norm-wise, per leaf: ``‖swept - reference‖ ≤ MOVE_RTOL · ‖reference - initial‖``."""
  for (path, x), y, z in zip(jax.tree_util.tree_flatten_with_path(reference)[0], jax.tree.leaves(swept),
                             jax.tree.leaves(initial)):
    x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
    moved = np.linalg.norm(x - z)
    assert moved > 0, jax.tree_util.keystr(path)
    assert np.linalg.norm(y - x) <= MOVE_RTOL * moved, (jax.tree_util.keystr(path), np.linalg.norm(y - x) / moved)


def gradient_recorder() -> optax.GradientTransformation:
  """An inner transformation that moves nothing and keeps the last gradient it was given as its state."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@LAYOUTS
@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_layerwise_gradients_equal_the_whole_tree_gradients(grad_clip, stacked):
  """The sweep's accumulated (and clipped) gradients, as each layer's optimizer receives them."""
  cfg = layout(CFG, stacked)
  tx = layerwise.by_layer(gradient_recorder(), grad_clip, stacked=stacked)
  params = initial_params(cfg)
  got = {}
  for swept in (False, True):
    step = steps.make_steps(nnx.graphdef(llama.Llama(cfg, rngs=nnx.Rngs(0))), tx, grad_accum=2, packed=False,
                            layerwise_updates=swept).train
    got[swept] = step(jax.tree.map(jnp.copy, params), tx.init(params), batch(0))[1]
  for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(got[False])[0], jax.tree.leaves(got[True])):
    want, have = np.asarray(want), np.asarray(have)
    assert np.abs(want).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(have, want, rtol=0, atol=GRAD_RTOL * np.abs(want).max(),
                               err_msg=jax.tree_util.keystr(path))


def galore_tx():  # gap 2 over 4 steps: refreshes at steps 0 and 2, with the kept moments in between
  return galore_adamw(1e-2, rank=4, update_proj_gap=2, scale=0.25, weight_decay=0.01)


@LAYOUTS
@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_layerwise_equals_whole_tree_with_accumulation_and_clipping(grad_clip, stacked):
  cfg = layout(CFG, stacked)
  tx = layerwise.by_layer(galore_tx(), grad_clip, stacked=stacked)
  reference, ref_metrics = run(tx, layerwise_updates=False, grad_accum=2, cfg=cfg)
  swept, metrics = run(tx, layerwise_updates=True, grad_accum=2, cfg=cfg)
  assert_same_training(swept, reference, initial_params(cfg))
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
  if grad_clip:  # the clip was active: the pre-clip norm is far above it
    assert min(r["grad_norm"] for r in ref_metrics) > 10 * grad_clip
  assert np.isnan(metrics[0]["subspace_overlap"]) and 0 < metrics[2]["subspace_overlap"] <= 1
  # the sweep sums each group's overlaps as it updates it; the reference averages over the whole new state
  np.testing.assert_allclose(metrics[2]["subspace_overlap"], ref_metrics[2]["subspace_overlap"], rtol=1e-5)


@pytest.mark.parametrize("make", [fira_adamw, apollo_adamw, functools.partial(golore_adamw, switch_step=2),
                                  functools.partial(q_galore_adamw, basis_group_size=16)],
                         ids=["fira", "apollo", "golore", "q_galore"])
def test_layerwise_fira_and_apollo_equal_their_whole_tree_step(make):
  """Their limiter norms and random projections live in each layer's own state, as the bases do."""
  tx = layerwise.by_layer(make(1e-2, rank=4, update_proj_gap=2, weight_decay=0.01), 0.0)
  reference, _ = run(tx, layerwise_updates=False, grad_accum=2)
  swept, _ = run(tx, layerwise_updates=True, grad_accum=2)
  assert_same_training(swept, reference, initial_params())


@LAYOUTS
def test_by_layer_equals_the_plain_chain(stacked):
  """One state per layer changes nothing: GaLore's schedule and projections are per leaf (per batch element of a
  stacked kernel, whose layer axis the plain chain treats as a batch axis)."""
  cfg = layout(CFG, stacked)
  plain = optax.chain(optax.clip_by_global_norm(0.05), galore_tx())
  reference, _ = run(plain, layerwise_updates=False, grad_accum=1, cfg=cfg)
  swept, _ = run(layerwise.by_layer(galore_tx(), 0.05, stacked=stacked), layerwise_updates=True, grad_accum=1, cfg=cfg)
  assert_same_training(swept, reference, initial_params(cfg))


@LAYOUTS
def test_layerwise_packed_tied_and_8bit(stacked):
  cfg = layout(CFG.replace(tie_word_embeddings=True), stacked)
  tx = layerwise.by_layer(galore_adamw_8bit(1e-2, rank=4, update_proj_gap=2, min_8bit_size=256), 0.0, stacked=stacked)
  reference, _ = run(tx, layerwise_updates=False, grad_accum=2, cfg=cfg, packed=True, n_steps=3)
  swept, _ = run(tx, layerwise_updates=True, grad_accum=2, cfg=cfg, packed=True, n_steps=3)
  # a reassociation-sized difference can move an 8-bit moment to the neighbouring code: looser than fp32
  assert_close_trees(swept, reference, atol=1e-4)


def stack_layers(tree, n_layers):
  """An unrolled tree's ``layers`` ``{i: layer}`` as one layer tree with a leading axis (the scan_layers layout)."""
  layers = [tree["layers"][i] for i in range(n_layers)]
  return {**tree, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def test_stacked_state_is_the_unrolled_state_stacked():
  """The same weights trained layerwise, unrolled and stacked: equal weights, and the stacked optimizer state's
  slice i equals layer i's unrolled state (what a checkpoint of either layout holds)."""
  tx = {s: layerwise.by_layer(galore_adamw_8bit(1e-2, rank=4, update_proj_gap=2, min_8bit_size=256), 0.05, stacked=s)
        for s in (False, True)}
  unrolled = initial_params()
  params = {False: jax.tree.map(jnp.copy, unrolled), True: stack_layers(jax.tree.map(jnp.copy, unrolled), 3)}
  state = {s: tx[s].init(params[s]) for s in params}
  for s in params:
    step = steps.make_steps(nnx.graphdef(llama.Llama(layout(CFG, s), rngs=nnx.Rngs(0))), tx[s], grad_accum=2,
                            packed=False, layerwise_updates=True).train
    for t in range(3):  # refreshes at steps 0 and 2
      params[s], state[s], _ = step(params[s], state[s], batch(t))
  assert jax.tree.structure(state[True]["rest"]) == jax.tree.structure(state[False]["rest"])
  assert_same_training(params[True], stack_layers(params[False], CFG.num_hidden_layers), stack_layers(unrolled, 3))
  restacked = stack_layers(state[False], CFG.num_hidden_layers)["layers"]
  assert jax.tree.structure(state[True]["layers"]) == jax.tree.structure(restacked)
  for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(restacked)[0],
                                jax.tree.leaves(state[True]["layers"])):
    assert have.shape == want.shape and have.dtype == want.dtype, jax.tree_util.keystr(path)
    if jnp.issubdtype(want.dtype, jnp.floating):  # bases and moments; 8-bit codes may move by one code
      np.testing.assert_allclose(np.asarray(have, np.float32), np.asarray(want, np.float32), atol=1e-3, rtol=0,
                                 err_msg=jax.tree_util.keystr(path))
    elif want.dtype == jnp.int32:  # step counts
      np.testing.assert_array_equal(have, want, err_msg=jax.tree_util.keystr(path))


@LAYOUTS
@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_layerwise_step_has_no_full_gradient_tree(grad_clip, stacked):
  """With accumulation (or clipping), the whole-tree step holds a full gradient tree in XLA's temporaries;
  the layerwise step about half of one (one layer's gradient, the rest group's, activations)."""
  cfg = layout(CFG.replace(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=64), stacked)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  grads_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  tx = layerwise.by_layer(galore_adamw(1e-2, rank=8, update_proj_gap=2), grad_clip, stacked=stacked)
  state = jax.eval_shape(tx.init, params)
  b = batch(0, b=2, s=8)
  temps = {}
  for swept in (False, True):
    step = steps.make_steps(graphdef, tx, grad_accum=2, packed=False, layerwise_updates=swept).train
    temps[swept] = step.lower(params, state, b).compile().memory_analysis().temp_size_in_bytes
  assert temps[False] > grads_bytes  # the whole-tree step holds every gradient at once
  assert temps[True] < 0.6 * grads_bytes, (temps, grads_bytes)


def test_stacked_program_does_not_grow_with_depth():
  """The stacked sweep is one scan: its program is the same at 2 and 6 layers; the unrolled one grows with them."""
  tx_def = lambda stacked: layerwise.by_layer(galore_adamw(1e-2, rank=4, update_proj_gap=2), 1.0, stacked=stacked)
  size = {}
  for stacked in (False, True):
    for n in (2, 6):
      cfg = layout(CFG.replace(num_hidden_layers=n), stacked)
      abstract = nnx.eval_shape(lambda cfg=cfg: llama.Llama(cfg, rngs=nnx.Rngs(0)))
      params, tx = steps.params_of(abstract), tx_def(stacked)
      step = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=2, packed=False, layerwise_updates=True).train
      size[stacked, n] = len(step.lower(params, jax.eval_shape(tx.init, params), batch(0)).as_text())
  assert size[False, 6] > 2 * size[False, 2], size
  assert size[True, 6] < 1.05 * size[True, 2], size


def test_config_wiring():
  cfg = base()
  cfg.train.layerwise = True
  cfg.train.grad_clip = 1.0
  del cfg["mesh"]  # layerwise runs on one device; this test process has eight
  tx = config.build_optimizer(cfg)
  assert isinstance(tx, layerwise.ByLayer) and tx.grad_clip == 1.0 and not tx.stacked
  cfg.model.scan_layers = True
  config.validate(cfg)
  assert config.build_optimizer(cfg).stacked


def test_layout_mismatch_is_refused():
  params = initial_params()
  step = steps.make_steps(nnx.graphdef(llama.Llama(CFG, rngs=nnx.Rngs(0))),
                          layerwise.by_layer(galore_tx(), stacked=True),
                          grad_accum=1, packed=False, layerwise_updates=True).train
  with pytest.raises(ValueError, match="scan_layers=False"):
    step(params, layerwise.by_layer(galore_tx()).init(params), batch(0))


@pytest.mark.parametrize("delta_dtype", [jnp.bfloat16, jnp.float32])
def test_layers_add_is_apply_updates_on_the_slice(delta_dtype):
  """The sweep's in-place write of an update into a stacked leaf is ``optax.apply_updates`` on that layer's slice,
  bit for bit, whatever the update's dtype (the same dtype is added in place, another rounded as optax rounds)."""
  stack = jax.random.normal(jax.random.key(0), (3, 4, 5)).astype(jnp.bfloat16)
  delta = (1e-2 * jax.random.normal(jax.random.key(1), (4, 5))).astype(delta_dtype)
  layers = layerwise.Layers(n=3, keys=None)
  got = jax.jit(lambda s, d, i: layers.add({"w": s}, i, {"w": d}))(stack, delta, 1)["w"]
  want = stack.at[1].set(optax.apply_updates(stack[1], delta))
  assert got.dtype == stack.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


H100_SWEEP = """
import json, math
import jax, jax.numpy as jnp
from flax import nnx
from bench import gpu_target
from galore_jax import galore_adamw_8bit
from galore_jax.models import llama
from galore_jax.train import layerwise, steps

cfg = llama.LlamaConfig(vocab_size=64, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                        num_attention_heads=32, param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
params = steps.params_of(abstract)
tx = layerwise.by_layer(galore_adamw_8bit(1e-2, rank=1024, update_proj_gap=200), 1.0, stacked=True)
batch = {k: jax.ShapeDtypeStruct((1, 256), d) for k, d in [("inputs", jnp.int32), ("targets", jnp.int32),
         ("loss_mask", jnp.float32), ("segment_ids", jnp.int32), ("positions", jnp.int32)]}
on_h100 = jax.sharding.SingleDeviceSharding(gpu_target.device("h100"))
args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_h100),
                    (params, jax.eval_shape(tx.init, params), batch))
step = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=1, packed=False, layerwise_updates=True,
                        skip_nonfinite=True).train
layer = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params["layers"])) // 2
print(json.dumps({"temp": step.lower(*args).compile().memory_analysis().temp_size_in_bytes, "layer": layer}))
"""


def test_stacked_sweep_compiled_for_an_h100_copies_no_layer():
  """Two Llama-7B layers, stacked, 8-bit GaLore with clipping and skipping, compiled by XLA's CUDA compiler for an
  H100 on this CPU (bench/gpu_target.py): the sweep's temporaries are one layer's gradient and the update's
  working set, under 2.85 layers' weights (1.06 GB here). Before the stacks were updated in place (a carried
  "pending" copy of the layer, and the layer's weights sliced out again for the update) they were 3.2 (1.29 GB)."""
  from bench import gpu_target

  out = subprocess.run([sys.executable, "-c", H100_SWEEP], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       env=gpu_target.environment())
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["temp"] < 2.85 * r["layer"], r
