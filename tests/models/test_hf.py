"""Hugging Face interop: logits parity with transformers' PyTorch Llama both ways, sharding, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from galore_jax.models import hf, llama
from galore_jax.models.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
TOL = 1e-4


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def hf_model(kv_heads=4, tied=False, rope=None, seed=0, dtype=None, **extra):
  """A tiny random transformers Llama, with weights larger than the init so that errors show."""
  torch = pytest.importorskip("torch")
  rope_parameters = {"rope_type": "default", "rope_theta": 10000.0} if rope is None else {**rope, "rope_theta": 500.0}
  config = transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=kv_heads, max_position_embeddings=128, rope_parameters=rope_parameters,
      tie_word_embeddings=tied, **extra)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  if dtype is not None:
    model = model.to(dtype)
  return model


def torch_logits(model, ids):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def token_ids(B=2, S=33, vocab=101, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (B, S))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


CASES = [
    dict(kv_heads=4, tied=False, rope=None),
    dict(kv_heads=2, tied=False, rope=None),
    dict(kv_heads=4, tied=True, rope=None),
    dict(kv_heads=2, tied=True, rope=LLAMA3_ROPE),
    dict(kv_heads=2, tied=False, rope=LLAMA3_ROPE),
]
CASE_IDS = ["mha-untied-default", "gqa-untied-default", "mha-tied-default", "gqa-tied-llama3", "gqa-untied-llama3"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_parity_both_directions(case, tmp_path):
  ref = hf_model(**case)
  ids = token_ids()
  expected = torch_logits(ref, ids)
  ref.save_pretrained(tmp_path / "in")

  model = hf.from_hf(tmp_path / "in")
  assert model.config.tie_word_embeddings == case["tied"]
  assert model.config.num_key_value_heads == case["kv_heads"]
  assert (model.config.rope_scaling is None) == (case["rope"] is None)
  assert max_diff(model(ids), expected) <= TOL

  hf.to_hf(model, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert max_diff(torch_logits(back, ids), expected) <= TOL
  if case["tied"]:
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoints_both_directions(tmp_path):
  ref = hf_model(kv_heads=2, rope=LLAMA3_ROPE)
  ids = token_ids()
  expected = torch_logits(ref, ids)
  ref.save_pretrained(tmp_path / "in", max_shard_size="40KB")
  assert os.path.exists(tmp_path / "in" / hf.INDEX_FILE)
  assert not os.path.exists(tmp_path / "in" / hf.SINGLE_FILE)
  model = hf.from_hf(tmp_path / "in")
  assert max_diff(model(ids), expected) <= TOL
  # The tolerance discriminates: a wrong RoPE base is far outside it.
  assert max_diff(hf.from_hf(tmp_path / "in", rope_theta=10000.0)(ids), expected) > 100 * TOL

  hf.to_hf(model, tmp_path / "out", max_shard_size="30KB")
  files = sorted(os.listdir(tmp_path / "out"))
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and hf.SINGLE_FILE not in files
  index = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())
  assert set(index["weight_map"]) == {s.name for s in hf.hf_tensor_specs(model.config)}
  assert index["metadata"]["total_size"] == 4 * llama.count_params(model.config)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert max_diff(torch_logits(back, ids), expected) <= TOL
  # Re-exporting unsharded into the same directory leaves no stale shards behind.
  hf.to_hf(model, tmp_path / "out")
  assert not [f for f in os.listdir(tmp_path / "out") if f.startswith("model-")]
  assert max_diff(hf.from_hf(tmp_path / "out")(ids), expected) <= TOL


def test_scan_layers_round_trip(tmp_path):
  ref = hf_model(kv_heads=2)
  ids = token_ids()
  expected = torch_logits(ref, ids)
  ref.save_pretrained(tmp_path / "in")
  model = hf.from_hf(tmp_path / "in", scan_layers=True, remat=True)
  assert model.config.scan_layers and model.layers.attn.q_proj.kernel[...].shape == (2, 64, 64)
  assert max_diff(model(ids), expected) <= TOL
  hf.to_hf(model, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert max_diff(torch_logits(back, ids), expected) <= TOL


def test_legacy_config_spelling(tmp_path):
  """Hub checkpoints written by transformers 4.x: rope_theta + rope_scaling, torch_dtype."""
  ref = hf_model(kv_heads=2, rope=LLAMA3_ROPE)
  ids = token_ids()
  expected = torch_logits(ref, ids)
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  rope = config.pop("rope_parameters")
  config["rope_theta"] = rope.pop("rope_theta")
  config["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
  config["torch_dtype"] = config.pop("dtype")
  (tmp_path / "config.json").write_text(json.dumps(config))
  model = hf.from_hf(tmp_path)
  assert model.config.rope_theta == 500.0 and model.config.rope_scaling["factor"] == 8.0
  assert max_diff(model(ids), expected) <= TOL


def test_exported_config_fields(tmp_path):
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=123.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5,
                    max_position_embeddings=64)
  hf.to_hf(Llama(cfg, rngs=nnx.Rngs(0)), tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
  assert config["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 123.0}
  assert config["rope_theta"] == 123.0 and config["rope_scaling"] == LLAMA3_ROPE
  assert config["dtype"] == config["torch_dtype"] == "float32"
  loaded = transformers.AutoConfig.from_pretrained(tmp_path)
  assert loaded.rope_parameters["rope_type"] == "llama3" and loaded.rope_parameters["rope_theta"] == 123.0
  assert loaded.num_key_value_heads == 2 and loaded.rms_norm_eps == 1e-5 and loaded.head_dim == 8
  assert hf.config_from_hf(config) == cfg


@pytest.mark.parametrize("existing", ['{"model": {"preset": "llama_20m"}, "train": {}}', "[1, 2]", "not json"],
                         ids=["a-run-config", "json-not-an-object", "unreadable"])
def test_export_never_overwrites_a_config_that_is_not_a_models(tmp_path, existing):
  model = Llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4), rngs=nnx.Rngs(0))
  (tmp_path / "config.json").write_text(existing)
  with pytest.raises(ValueError, match=f"'{tmp_path}' holds a config.json that is not a transformers model's"):
    hf.to_hf(model, tmp_path)
  assert (tmp_path / "config.json").read_text() == existing and os.listdir(tmp_path) == ["config.json"]
  with pytest.raises(ValueError, match="exists and is not a directory"):
    hf.to_hf(model, tmp_path / "config.json")
  hf.to_hf(model, tmp_path / "export")  # a new directory, then an earlier export's, are written
  hf.to_hf(model, tmp_path / "export")
  assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llama"


def test_bfloat16_both_directions(tmp_path):
  torch = pytest.importorskip("torch")
  ref = hf_model(kv_heads=2, dtype=torch.bfloat16)
  ref.save_pretrained(tmp_path / "in")
  model = hf.from_hf(tmp_path / "in")
  assert model.config.param_dtype == jnp.bfloat16 and model.config.dtype == jnp.bfloat16
  for hf_name, torch_param in ref.state_dict().items():
    spec = next(s for s in hf.hf_tensor_specs(model.config) if s.name == hf_name)
    ours = np.asarray(hf._get_param(_flat_params(model), spec)).astype(np.float32)
    theirs = torch_param.float().numpy()
    np.testing.assert_array_equal(ours.T if spec.transpose else ours, theirs)
  fp32 = hf.from_hf(tmp_path / "in", param_dtype=jnp.float32)
  assert fp32.config.param_dtype == jnp.float32 and fp32.config.dtype == jnp.float32
  ids = token_ids()
  # bf16 compute vs fp32 compute of the same bf16 weights: loose, only a sanity check.
  assert max_diff(model(ids), fp32(ids)) < 0.2

  hf.to_hf(model, tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
  assert back.dtype == torch.bfloat16
  for name, tensor in ref.state_dict().items():
    assert torch.equal(back.state_dict()[name], tensor), name
  # to_hf can also cast on export.
  hf.to_hf(fp32, tmp_path / "cast", dtype="bfloat16")
  assert json.loads((tmp_path / "cast" / "config.json").read_text())["dtype"] == "bfloat16"


def _flat_params(model):
  keyed, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
  return {hf._path_key(k): v for k, v in keyed}


def test_raw_reader_matches_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors import safe_open
  from safetensors.torch import save_file

  tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "c": torch.arange(6).reshape(2, 3)}
  save_file(tensors, tmp_path / "t.safetensors")
  with safe_open(tmp_path / "t.safetensors", framework="numpy") as f:
    for name, tensor in tensors.items():
      raw = hf._read_raw(str(tmp_path / "t.safetensors"), name)
      np.testing.assert_array_equal(raw, f.get_tensor(name))
      assert raw.dtype == f.get_tensor(name).dtype
      np.testing.assert_array_equal(np.asarray(raw).astype(np.float32), tensor.float().numpy())


def test_tokenizer_is_saved(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                   unk_token="<unk>")
  model = Llama(LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2), rngs=nnx.Rngs(0))
  hf.to_hf(model, tmp_path, tokenizer=tokenizer)
  assert (tmp_path / "tokenizer.json").exists()
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert reloaded("hello world")["input_ids"][-2:] == [3, 4]


# ----------------------------------------------------------------------------- errors


def _rewrite_single_file(path, edit):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(path / hf.SINGLE_FILE)
  edit(tensors)
  save_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  hf_model().save_pretrained(tmp_path)
  _rewrite_single_file(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
    hf.from_hf(tmp_path)


def test_missing_lm_head_when_untied(tmp_path):
  hf_model().save_pretrained(tmp_path)
  _rewrite_single_file(tmp_path, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ValueError, match="missing tensors.*lm_head.weight"):
    hf.from_hf(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
  hf_model().save_pretrained(tmp_path)
  _rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"):
    hf.from_hf(tmp_path)


def test_ignorable_extras_are_accepted(tmp_path):
  """Old checkpoints store rotary inv_freq buffers; tied ones sometimes keep lm_head.weight."""
  ref = hf_model(tied=True)
  ref.save_pretrained(tmp_path)
  ids = token_ids()

  def add(t):
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

  _rewrite_single_file(tmp_path, add)
  assert max_diff(hf.from_hf(tmp_path)(ids), torch_logits(ref, ids)) <= TOL


def test_misshaped_tensor_is_named(tmp_path):
  hf_model().save_pretrained(tmp_path)
  _rewrite_single_file(tmp_path,
                       lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((64, 95), np.float32)}))
  with pytest.raises(ValueError,
                     match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 95\), expected \(64, 96\)"):
    hf.from_hf(tmp_path)


def test_sharded_missing_tensor(tmp_path):
  hf_model().save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  del index["weight_map"]["model.norm.weight"]
  (tmp_path / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match="missing tensors.*model.norm.weight"):
    hf.from_hf(tmp_path)


def test_no_weights(tmp_path):
  hf_model().config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.from_hf(tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda path: (path / hf.SINGLE_FILE).write_bytes(b"garbage"), r"model.safetensors is not a readable safetensors"),
    (lambda path: (path / hf.SINGLE_FILE).write_bytes((path / hf.SINGLE_FILE).read_bytes()[:-100]),
     r"model.safetensors is not a readable safetensors file \(.*not fully covered"),
    (lambda path: (path / hf.INDEX_FILE).write_text('{"metadata": {}}'),
     r"model.safetensors.index.json is not a safetensors index \(KeyError"),
    (lambda path: (path / hf.INDEX_FILE).write_text("{"), r"model.safetensors.index.json is not a safetensors index"),
])
def test_damaged_weight_files_are_a_value_error_naming_the_file(tmp_path, damage, message):
  hf_model().save_pretrained(tmp_path)
  damage(tmp_path)
  with pytest.raises(ValueError, match=message):
    hf.from_hf(tmp_path)


BASE_CONFIG = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2)


@pytest.mark.parametrize("change,message", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "RoPE type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(vocab_size=None), "vocab_size"),
])
def test_unsupported_configs_are_refused(change, message, tmp_path):
  config = {**BASE_CONFIG, **change}
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(config)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message):
    hf.from_hf(tmp_path)


def test_config_defaults_and_overrides():
  cfg = hf.config_from_hf(BASE_CONFIG, scan_layers=True)
  assert cfg.num_key_value_heads == 2 and cfg.head_dim == 8 and cfg.rope_theta == 10000.0
  assert cfg.rope_scaling is None and not cfg.tie_word_embeddings and cfg.scan_layers
  assert hf.config_from_hf({**BASE_CONFIG, "head_dim": None, "rope_scaling": None}).head_dim == 8
