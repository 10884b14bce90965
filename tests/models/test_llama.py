"""The Flax NNX Llama: per-module parity with transformers, features, presets, a GaLore step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from galore_jax.models import llama
from galore_jax.models.llama import Llama, LlamaConfig

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def tiny(**overrides) -> LlamaConfig:
  fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
  fields.update(overrides)
  return LlamaConfig(**fields)


def keystr(keypath) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
  return "/".join(names).removesuffix("/value")


def param_paths(tree) -> dict[str, jax.Array]:
  return {keystr(k): leaf for k, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stack_into_scan(loop_model: Llama) -> Llama:
  """A scan_layers model with the loop model's weights."""
  cfg = loop_model.config
  scan_model = Llama(cfg.replace(scan_layers=True), rngs=nnx.Rngs(1))
  loop_params = param_paths(nnx.state(loop_model, nnx.Param))
  graphdef, state = nnx.split(scan_model)
  keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
  leaves = []
  for keypath, _ in keyed:
    path = keystr(keypath)
    if path.startswith("layers/"):
      rest = path.removeprefix("layers/")
      leaves.append(jnp.stack([loop_params[f"layers/{i}/{rest}"] for i in range(cfg.num_hidden_layers)]))
    else:
      leaves.append(loop_params[path])
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def hf_config(cfg: LlamaConfig, **extra):
  transformers = pytest.importorskip("transformers")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings, **extra)
  hf._attn_implementation = "eager"
  return hf


def set_linear(linear: nnx.Linear, torch_linear):
  linear.kernel[...] = jnp.asarray(torch_linear.weight.detach().numpy().T)


def randn(*shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ----------------------------------------------------------------------------- per-module parity


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_rope_matches_transformers(scaling):
  torch = pytest.importorskip("torch")
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

  cfg = tiny(rope_scaling=scaling, rope_theta=500.0)
  rotary = LlamaRotaryEmbedding(hf_config(cfg))
  positions = np.array([[0, 1, 2, 7, 30, 127], [5, 6, 100, 101, 3, 0]])
  cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
  cos, sin = llama.rope_cos_sin(jnp.asarray(positions), cfg)
  # float32 pow differs from torch's by an ulp in some frequencies: ~position * 6e-8.
  np.testing.assert_allclose(cos, cos_ref.numpy(), atol=2e-5)
  np.testing.assert_allclose(sin, sin_ref.numpy(), atol=2e-5)
  np.testing.assert_allclose(llama.rope_inv_freq(cfg), rotary.inv_freq.numpy(), rtol=1e-6)

  q, k = randn(2, 6, 4, 16, seed=1), randn(2, 6, 2, 16, seed=2)
  q_ref, k_ref = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2), cos_ref,
                                      sin_ref)
  np.testing.assert_allclose(llama.apply_rope(jnp.asarray(q), cos, sin), q_ref.transpose(1, 2).numpy(), atol=5e-5)
  np.testing.assert_allclose(llama.apply_rope(jnp.asarray(k), cos, sin), k_ref.transpose(1, 2).numpy(), atol=5e-5)
  # With the same cos/sin, the rotation itself agrees to rounding.
  cos_t, sin_t = jnp.asarray(cos_ref.numpy()), jnp.asarray(sin_ref.numpy())
  np.testing.assert_allclose(llama.apply_rope(jnp.asarray(q), cos_t, sin_t), q_ref.transpose(1, 2).numpy(), atol=1e-6)


def test_llama3_scaling_changes_only_low_frequencies():
  scaling = {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}
  plain, scaled = llama.rope_inv_freq(tiny()), llama.rope_inv_freq(tiny(rope_scaling=scaling))
  assert scaled[0] == plain[0]
  np.testing.assert_allclose(scaled[-1], plain[-1] / 8, rtol=1e-6)


def test_rmsnorm_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.llama.modeling_llama import LlamaRMSNorm

  ref = LlamaRMSNorm(64, eps=1e-6)
  with torch.no_grad():
    ref.weight.normal_()
  norm = llama.RMSNorm(64, tiny())
  norm.scale[...] = jnp.asarray(ref.weight.detach().numpy())
  x = randn(2, 5, 64)
  np.testing.assert_allclose(norm(jnp.asarray(x)), ref(torch.tensor(x)).detach().numpy(), atol=1e-5)


def test_mlp_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.llama.modeling_llama import LlamaMLP

  cfg = tiny()
  torch.manual_seed(0)
  ref = LlamaMLP(hf_config(cfg))
  mlp = llama.MLP(cfg, rngs=nnx.Rngs(0))
  for name in ("gate_proj", "up_proj", "down_proj"):
    set_linear(getattr(mlp, name), getattr(ref, name))
  x = randn(2, 5, 64)
  np.testing.assert_allclose(mlp(jnp.asarray(x)), ref(torch.tensor(x)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_matches_transformers(kv_heads):
  torch = pytest.importorskip("torch")
  from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

  cfg = tiny(num_key_value_heads=kv_heads)
  hf = hf_config(cfg)
  torch.manual_seed(0)
  ref = LlamaAttention(hf, layer_idx=0).eval()
  attn = llama.Attention(cfg, rngs=nnx.Rngs(0))
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    set_linear(getattr(attn, name), getattr(ref, name))
  B, S = 2, 7
  x = randn(B, S, 64)
  positions = np.broadcast_to(np.arange(S), (B, S))
  cos_ref, sin_ref = LlamaRotaryEmbedding(hf)(torch.zeros(1), torch.tensor(positions))
  causal = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)[None, None]
  with torch.no_grad():
    expected = ref(torch.tensor(x), position_embeddings=(cos_ref, sin_ref), attention_mask=causal)[0].numpy()
  cos, sin = llama.rope_cos_sin(jnp.asarray(positions), cfg)
  got, cache = attn(jnp.asarray(x), cos, sin)
  assert cache is None
  np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- structure and presets


def test_parameter_paths_and_layouts():
  cfg = tiny()
  params = param_paths(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  assert params["layers/0/attn/q_proj/kernel"].shape == (64, 64)
  assert params["layers/0/attn/k_proj/kernel"].shape == (64, 32)
  assert params["layers/1/mlp/down_proj/kernel"].shape == (96, 64)
  assert params["layers/1/mlp/gate_proj/kernel"].shape == (64, 96)
  assert params["embed/embedding"].shape == (97, 64)
  assert params["lm_head/kernel"].shape == (64, 97)
  assert params["final_norm/scale"].shape == (64,)
  assert params["layers/0/input_norm/scale"].shape == (64,)
  assert params["layers/0/post_attention_norm/scale"].shape == (64,)
  assert len(params) == 2 + 1 + 9 * 2
  targeted = {p for p, x in params.items() if x.ndim >= 2 and re.search("attn|mlp", p)}
  assert len(targeted) == 7 * 2 and all(p.endswith("_proj/kernel") for p in targeted)

  tied = param_paths(nnx.state(Llama(cfg.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0)), nnx.Param))
  assert "lm_head/kernel" not in tied

  stacked = param_paths(nnx.state(Llama(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0)), nnx.Param))
  assert stacked["layers/attn/q_proj/kernel"].shape == (2, 64, 64)
  assert stacked["layers/mlp/down_proj/kernel"].shape == (2, 96, 64)
  assert stacked["layers/input_norm/scale"].shape == (2, 64)


def test_initialisation_as_reference():
  params = param_paths(nnx.state(Llama(tiny(hidden_size=128, intermediate_size=256), rngs=nnx.Rngs(0)), nnx.Param))
  for path, x in params.items():
    if path.endswith("scale"):
      np.testing.assert_array_equal(x, 1.0)
    else:
      assert abs(float(jnp.std(x)) - 0.02) < 0.002, path
      assert abs(float(jnp.mean(x))) < 0.002, path


@pytest.mark.parametrize("name,total,attn_mlp", [
    ("llama_60m", 58.1e6, 25.3e6),
    ("llama_130m", 134.1e6, 84.9e6),
    ("llama_350m", 368.0e6, 302.4e6),
    ("llama_1b", 1339.1e6, 1207.9e6),
    ("llama_7b", 6_738_415_616, None),
])
def test_preset_parameter_counts(name, total, attn_mlp):
  cfg = llama.preset(name)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  params = param_paths(nnx.state(abstract, nnx.Param))
  count = sum(int(np.prod(x.shape)) for x in params.values())
  assert count == llama.count_params(cfg)
  if isinstance(total, int):
    assert count == total
  else:
    assert round(count / 1e6, 1) == round(total / 1e6, 1)
  if attn_mlp is not None:
    galore = sum(int(np.prod(x.shape)) for p, x in params.items() if len(x.shape) >= 2 and re.search("attn|mlp", p))
    assert round(galore / 1e6, 1) == round(attn_mlp / 1e6, 1)


def test_presets_match_reference_configs():
  assert set(llama.PRESETS) == {"llama_9m", "llama_20m", "llama_35m", "llama_60m", "llama_130m", "llama_350m",
                                "llama_1b", "llama_3b", "llama_7b", "llama3_8b"}
  c3 = llama.PRESETS["llama_3b"]
  assert (c3.hidden_size, c3.intermediate_size, c3.num_attention_heads, c3.num_hidden_layers) == (2560, 6848, 32, 32)
  for name, cfg in llama.PRESETS.items():
    if name.startswith("llama_"):
      assert cfg.vocab_size == 32000 and cfg.rms_norm_eps == 1e-6 and not cfg.tie_word_embeddings
      assert cfg.max_position_embeddings == (2048 if name == "llama_7b" else 1024)
  c8 = llama.PRESETS["llama3_8b"]
  assert (c8.num_key_value_heads, c8.vocab_size, c8.rope_theta, c8.rms_norm_eps) == (8, 128256, 500000.0, 1e-5)
  assert c8.rope_scaling["factor"] == 8.0 and c8.rope_scaling["original_max_position_embeddings"] == 8192
  assert llama.preset("llama_60m", dtype="bfloat16").dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="unknown preset"):
    llama.preset("llama_2m")


def test_config_validation():
  with pytest.raises(ValueError, match="multiple of"):
    tiny(num_key_value_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    tiny(remat_policy="everything")
  with pytest.raises(ValueError, match="rope_type"):
    tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="lacks"):
    tiny(rope_scaling={"rope_type": "llama3", "factor": 2.0})
  assert tiny(rope_scaling={"rope_type": "default"}).rope_scaling is None
  cfg = tiny(rope_scaling=LLAMA3_SCALING)
  assert hash(cfg) == hash(tiny(rope_scaling=dict(LLAMA3_SCALING))) and cfg == cfg.replace()
  with pytest.raises(ValueError, match="num_hidden_layers must be a positive int, got 0"):
    tiny(num_hidden_layers=0)
  with pytest.raises(ValueError, match="num_key_value_heads must be a positive int, got 0"):
    tiny(num_key_value_heads=0)
  with pytest.raises(ValueError, match="vocab_size must be a positive int, got 6.5"):
    tiny(vocab_size=6.5)
  with pytest.raises(ValueError, match="param_dtype must be a floating-point dtype, got int8"):
    tiny(param_dtype="int8")


@pytest.mark.parametrize("overrides", [
    {"hidden_size": 512}, {"num_attention_heads": 8}, {"num_attention_heads": 2},
    {"hidden_size": 384, "num_attention_heads": 6}, {"hidden_size": 512, "head_dim": 32},
    {"num_attention_heads": 8, "num_key_value_heads": 2}])
def test_preset_overrides_derive_head_dim_and_kv_heads_as_transformers(overrides):
  transformers = pytest.importorskip("transformers")
  base = llama.PRESETS["llama_20m"]
  theirs = transformers.LlamaConfig(**{"hidden_size": base.hidden_size,
                                       "num_attention_heads": base.num_attention_heads, **overrides})
  ours = llama.preset("llama_20m", **overrides)
  assert (ours.head_dim, ours.num_key_value_heads) == (theirs.head_dim, theirs.num_key_value_heads)
  assert llama.preset("llama3_8b", num_attention_heads=16).num_key_value_heads == 8  # its grouping is kept


# ----------------------------------------------------------------------------- features


def test_forward_shapes_and_dtypes():
  cfg = tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  assert model.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
  logits = model(jnp.zeros((3, 5), jnp.int32))
  assert logits.shape == (3, 5, 97) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_causality():
  model = Llama(tiny(), rngs=nnx.Rngs(0))
  ids = np.random.RandomState(0).randint(0, 97, (2, 10))
  changed = ids.copy()
  changed[:, 6:] = (changed[:, 6:] + 1) % 97
  np.testing.assert_allclose(model(ids)[:, :6], model(changed)[:, :6], atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_segment_ids_match_separate_sequences(scan_layers):
  model = Llama(tiny(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  rs = np.random.RandomState(0)
  a, b = rs.randint(0, 97, (1, 5)), rs.randint(0, 97, (1, 7))
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[1] * 5 + [2] * 7])
  logits = model(packed, segment_ids=segments)
  np.testing.assert_allclose(logits[:, :5], model(a), atol=2e-5)
  np.testing.assert_allclose(logits[:, 5:], model(b), atol=2e-5)
  np.testing.assert_array_equal(llama.segment_positions(jnp.asarray(segments)), [list(range(5)) + list(range(7))])
  # Explicit positions are used as given (RoPE is relative: only their differences matter).
  np.testing.assert_allclose(model(b, positions=np.arange(3, 10)[None]), model(b), atol=2e-5)
  stretched = model(b, positions=2 * np.arange(7)[None])
  assert not np.allclose(stretched[:, 1:], model(b)[:, 1:], atol=1e-4)
  np.testing.assert_allclose(
      model(packed, segment_ids=segments, positions=np.concatenate([np.arange(5), 2 * np.arange(7)])[None])[:, 5:],
      stretched, atol=2e-5)


def test_scan_layers_matches_loop():
  loop_model = Llama(tiny(rope_scaling=LLAMA3_SCALING), rngs=nnx.Rngs(0))
  scan_model = stack_into_scan(loop_model)
  ids = np.random.RandomState(0).randint(0, 97, (2, 12))
  np.testing.assert_allclose(scan_model(ids), loop_model(ids), atol=1e-5)


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_same_gradients(scan_layers, policy):
  base = Llama(tiny(), rngs=nnx.Rngs(0))
  if scan_layers:
    base = stack_into_scan(base)
  graphdef, state = nnx.split(base)
  remat_model = Llama(base.config.replace(remat=True, remat_policy=policy), rngs=nnx.Rngs(5))
  remat_graphdef, _ = nnx.split(remat_model)
  remat_model = nnx.merge(remat_graphdef, state)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 9)))
  grad = jax.jit(nnx.grad(_loss))
  expected = param_paths(grad(base, ids))
  got = param_paths(grad(remat_model, ids))
  assert expected.keys() == got.keys()
  for path in expected:
    np.testing.assert_allclose(got[path], expected[path], atol=1e-6, err_msg=path)


# ----------------------------------------------------------------------------- generation


def _greedy_by_full_forward(model, prompt, steps):
  """Greedy decoding by re-running the whole (causal, so zero-padded) sequence each step."""
  B, P = prompt.shape
  ids = np.zeros((B, P + steps), np.int32)
  ids[:, :P] = prompt
  forward = nnx.jit(lambda model, ids: model(ids))
  for t in range(P, P + steps):
    ids[:, t] = np.asarray(jnp.argmax(forward(model, ids)[:, t - 1], axis=-1))
  return ids


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_generate_greedy_matches_full_forward(scan_layers):
  # Larger weights than the init make the argmax well separated and the test meaningful.
  # remat=True: the decode loop closes over the model (regression for nnx trace-level errors).
  model = Llama(tiny(scan_layers=scan_layers, tie_word_embeddings=scan_layers, remat=True), rngs=nnx.Rngs(3))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, state)
  model = nnx.merge(graphdef, state)
  prompt = np.random.RandomState(0).randint(0, 97, (2, 5))
  out = llama.generate(model, prompt, max_new_tokens=8)
  assert out.shape == (2, 13)
  expected = _greedy_by_full_forward(model, prompt, 8)
  np.testing.assert_array_equal(out, expected)
  assert len(set(np.asarray(out[0, 5:]).tolist())) > 1  # not a degenerate constant continuation


def test_kv_cache_logits_match_full_forward():
  model = Llama(tiny(), rngs=nnx.Rngs(0))
  ids = np.random.RandomState(0).randint(0, 97, (2, 10))
  full = model(ids)
  cache = llama.init_cache(model.config, 2, 16)
  first, cache = model(ids[:, :6], cache=cache)
  second, cache = model(ids[:, 6:], cache=cache)
  assert int(cache.index) == 10
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, atol=2e-5)


def test_generate_sampling():
  model = Llama(tiny(), rngs=nnx.Rngs(0))
  prompt = np.zeros((3, 4), np.int32)
  a = llama.generate(model, prompt, 6, temperature=1.0, top_k=5, rng=jax.random.key(1))
  b = llama.generate(model, prompt, 6, temperature=1.0, top_k=5, rng=jax.random.key(1))
  c = llama.generate(model, prompt, 6, temperature=1.0, top_k=5, rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(a[:, :4], prompt)
  # top_k=1 is greedy.
  np.testing.assert_array_equal(llama.generate(model, prompt, 6, temperature=0.7, top_k=1),
                                llama.generate(model, prompt, 6))
  np.testing.assert_array_equal(llama.generate(model, prompt, 0), prompt)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
    llama.generate(model, prompt, -1)


# ----------------------------------------------------------------------------- GaLore on the model


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_galore_step_on_model(scan_layers):
  from galore_jax import galore_adamw, plan_leaves

  model = Llama(tiny(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  _, plans, keypaths = plan_leaves(params)
  all_paths = param_paths(params)
  names = list(all_paths)
  targeted = {names[i] for i, plan in enumerate(plans) if plan is not None}
  layer_prefixes = ["layers"] if scan_layers else ["layers/0", "layers/1"]
  expected = {f"{prefix}/{m}/{p}/kernel" for prefix in layer_prefixes
              for m, ps in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps}
  assert len(keypaths) == len(names)
  assert targeted == expected
  if scan_layers:  # the layer axis is a batch axis of the projection
    assert all(plan.batch_shape == (2,) for plan in plans if plan is not None)

  optimizer = nnx.Optimizer(model, galore_adamw(3e-3, rank=4, update_proj_gap=2), wrt=nnx.Param)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 97, (4, 17)))

  @nnx.jit
  def train_step(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(_loss)(model, ids)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, ids)) for _ in range(6)]
  assert losses[-1] < losses[0] - 0.05, losses


def test_attention_implementation_choice():
  cfg = tiny()
  assert llama._attention_impl(cfg, jnp.float32, has_mask=False) == "xla"
  on_gpu = jax.default_backend() == "gpu"
  assert llama._attention_impl(cfg, jnp.bfloat16, has_mask=False) == ("cudnn" if on_gpu else "xla")
  assert llama._attention_impl(cfg, jnp.bfloat16, has_mask=True) == "xla"
  assert llama._attention_impl(cfg.replace(attention_impl=None), jnp.bfloat16, has_mask=False) is None
  ids = np.random.RandomState(0).randint(0, 97, (2, 6))
  auto = Llama(cfg, rngs=nnx.Rngs(0))
  explicit = Llama(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(auto(ids), explicit(ids))
  with pytest.raises(ValueError, match="attention_impl"):
    tiny(attention_impl="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_rows_is_the_lookup_with_the_same_gradient(dtype):
  """``Embed.rows`` (what the layerwise step differentiates) against ``nnx.Embed``'s own lookup: the same rows and,
  with repeated ids, the same scattered gradient, bit for bit."""
  cfg = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                    param_dtype=dtype, dtype=dtype)
  embed = Llama(cfg, rngs=nnx.Rngs(0)).embed
  ids = jnp.array([[1, 3, 3, 49], [0, 1, 1, 1]])
  dy = jax.random.normal(jax.random.key(1), (2, 4, 8)).astype(dtype)

  def vjp(lookup):
    graphdef, state = nnx.split(embed)
    out, pullback = jax.vjp(lambda s: lookup(nnx.merge(graphdef, s), ids), state)
    return out, jax.tree.leaves(pullback(dy))[0]

  (rows, d_rows), (take, d_take) = vjp(lambda m, i: m.rows(i)), vjp(lambda m, i: m(i))
  np.testing.assert_array_equal(rows, take)
  np.testing.assert_array_equal(d_rows, d_take)
  want = sum(dy[b, s].astype(jnp.float32) for b, s in [(0, 0), (1, 1), (1, 2), (1, 3)])  # id 1, four times
  np.testing.assert_allclose(d_rows[1].astype(jnp.float32), want, rtol=0.02 if dtype == jnp.bfloat16 else 1e-6)
  assert not np.any(np.asarray(d_rows, np.float32)[[2, 4, 48]])  # ids never looked up
