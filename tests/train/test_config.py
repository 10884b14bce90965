"""The training app's optimizer wiring: every optimizer.name builds and steps; overlap metric per leaf."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs.base import base
from galore_jax.train import config, steps
from galore_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)


def batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (2, 17), dtype=np.int32)
  ones = np.ones((2, 16), np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones,
          "segment_ids": ones.astype(np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}


def steps_of(cfg, n=4):
  model = llama.Llama(CFG, rngs=nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  tx = config.build_optimizer(cfg)
  step = steps.make_steps(graphdef, tx, grad_accum=1, packed=False, report_overlap=True,
                             layerwise_updates=cfg.train.layerwise).train
  state, history = tx.init(params), []
  for t in range(n):
    before = jax.device_get(params)  # the step donates params
    params, state, m = step(params, state, batch(t))
    history.append((jax.device_get(m), jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(
        b, np.float32)).max()), jax.device_get(params), before)))
  return history


def make_config(**optimizer):
  cfg = base()
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 1e-2, 0, 10
  cfg.optimizer.rank, cfg.optimizer.update_proj_gap = 4, 2
  cfg.optimizer.min_8bit_size = 256
  cfg.optimizer.basis_group_size = 32  # int4 bases of the tiny model: d·r = 32·4
  cfg.optimizer.update(optimizer)
  config.resolve(cfg)  # as train.py does before validate (golore_adamw's switch step)
  return cfg


@pytest.mark.parametrize("name", list(config.BUILDERS))
def test_every_optimizer_name_builds_and_moves_every_weight(name):
  cfg = make_config(name=name)
  config.validate(cfg)
  history = steps_of(cfg, n=2)
  for metrics, moved in history:
    assert np.isfinite(metrics["loss"])
    assert all(d > 0 for d in jax.tree.leaves(moved)), moved


def test_stagger_overlap_is_reported_on_the_steps_that_refresh_some_leaves():
  """With stagger (gap 2) every step after the first refreshes some leaves: a finite overlap each time."""
  history = steps_of(make_config(stagger=True, refresh="randomized"), n=4)
  overlaps = [m["subspace_overlap"] for m, _ in history]
  assert np.isnan(overlaps[0]) and all(0 < o <= 1 for o in overlaps[1:]), overlaps


def test_plain_schedule_overlap_only_on_refresh_steps():
  overlaps = [m["subspace_overlap"] for m, _ in steps_of(make_config(), n=4)]
  assert np.isnan(overlaps[0]) and np.isnan(overlaps[1]) and 0 < overlaps[2] <= 1 and np.isnan(overlaps[3])


@pytest.mark.parametrize("key,value,needle", [("refresh", "fastest", "optimizer.refresh"),
                                              ("block_size", 512, "optimizer.block_size")])
def test_bad_optimizer_values_are_refused(key, value, needle):
  cfg = make_config(name="galore_adamw_8bit", **{key: value})
  with pytest.raises(config.ConfigError, match=needle):
    config.validate(cfg)


@pytest.mark.parametrize("name,section,key,value,needle", [
    ("adamw", None, "seed", -1, r"seed must be >= 0, got -1"),
    ("adamw", "train", "grad_clip", -1.0, r"train.grad_clip must be >= 0, got -1.0"),
    ("adamw", "optimizer", "weight_decay", -0.1, r"optimizer.weight_decay must be >= 0"),
    ("adamw", "optimizer", "eps", -1e-8, r"optimizer.eps must be >= 0"),
    ("galore_adamw", "optimizer", "b1", 1.5, r"optimizer.b1 must be in \[0, 1\), got 1.5"),
    ("adamw_8bit", "optimizer", "b2", 1.0, r"optimizer.b2 must be in \[0, 1\), got 1.0"),  # 1 - b2^t = 0
    ("galore_adafactor", "optimizer", "adafactor_beta1", 1.0, r"optimizer.adafactor_beta1 must be in \[0, 1\)"),
    ("galore_adamw", "optimizer", "scale", 0.0, r"optimizer.scale must be positive"),
    ("fira_adamw", "optimizer", "scale", -0.25, r"optimizer.scale must be positive"),
    ("galore_adamw", "model", "param_dtype", "int8", r"model: param_dtype must be a floating-point dtype, got int8"),
    ("galore_adamw", "model", "dtype", "int32", r"model: dtype must be a floating-point dtype, got int32"),
    ("galore_adamw", "model", "num_hidden_layers", 0, r"model: num_hidden_layers must be a positive int, got 0"),
    ("adamw", "mesh", "min_shard_size", -1, r"mesh.min_shard_size must be >= 0, got -1"),
])
def test_bad_run_values_are_refused_naming_the_value(name, section, key, value, needle):
  cfg = make_config(name=name)
  (cfg if section is None else cfg[section])[key] = value
  with pytest.raises(config.ConfigError, match=needle):
    config.validate(cfg)


def test_apollo_ignores_the_galore_scale():
  cfg = make_config(name="apollo_mini", scale=-1.0)  # APOLLO's own scale is apollo_scale
  config.validate(cfg)


@pytest.mark.parametrize("text,message", [
    ("x = 1\n", "defines no get_config()"),
    ("def get_config():\n  raise RuntimeError('boom')\n", "does not load: RuntimeError: boom"),
    ("def get_config(:\n", "does not load: SyntaxError: invalid syntax (line 1)"),
    ("def get_config():\n  return 5\n", "get_config() returned int '5', not a ConfigDict"),
])
def test_a_config_file_that_gives_no_config_is_one_line(tmp_path, capsys, text, message):
  import train

  path = tmp_path / "bad.py"
  path.write_text(text)
  with pytest.raises(SystemExit, match="^2$"):
    train.load_config_file(str(path))
  err = capsys.readouterr().err
  assert err.startswith(f"error: config file '{path}'") and message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------- resolve: what the command line leaves implicit


@pytest.mark.parametrize("spelling", ["None", "none", ""])
def test_none_or_empty_on_the_command_line_unsets_optional_strings(spelling):
  cfg = base()
  for name in config.OPTIONAL_STRINGS:
    section, key = name.split(".")
    cfg[section][key] = spelling
  config.resolve(cfg)
  assert [cfg[n.split(".")[0]][n.split(".")[1]] for n in config.OPTIONAL_STRINGS] == [None] * 4


def test_tokenizer_defaults_to_the_hf_checkpoints_own(tmp_path):
  checkpoint = tmp_path / "hf"
  checkpoint.mkdir()
  cfg = base()
  cfg.model.hf_checkpoint, cfg.data.tokenizer = str(checkpoint), "None"
  with pytest.raises(config.ConfigError, match=rf"model.hf_checkpoint '{checkpoint}' holds no tokenizer.*"
                                               r"--config.data.tokenizer=DIR"):
    config.resolve(cfg)
  (checkpoint / "tokenizer.json").write_text("{}")
  config.resolve(cfg)
  assert cfg.data.tokenizer == str(checkpoint)
  cfg.data.tokenizer = str(tmp_path / "other")  # an explicit tokenizer is kept
  config.resolve(cfg)
  assert cfg.data.tokenizer == str(tmp_path / "other")
  cfg.model.hf_checkpoint, cfg.data.tokenizer = str(tmp_path / "missing"), None  # validate reports a missing model
  config.resolve(cfg)
  assert cfg.data.tokenizer is None


@pytest.mark.parametrize("name,key,value,needle", [
    ("apollo_adamw", "apollo_scale_type", "row", "optimizer.apollo_scale_type"),
    ("apollo_mini", "apollo_proj", "orthogonal", "optimizer.apollo_proj"),
    ("apollo_adamw", "apollo_scale", -1.0, "optimizer.apollo_scale"),
    ("fira_adamw", "norm_growth_limit", 0.5, "optimizer.norm_growth_limit"),
    ("apollo_adamw", "on_refresh", "project", "optimizer.on_refresh='project' needs orthonormal bases"),
    ("fira_adamw", "proj_type", "full", r"optimizer.proj_type='full': fira: leaf 'layers/0/attn/\w+/kernel'"),
    ("golore_adamw", "golore_switch_step", -1, "optimizer.golore_switch_step"),
    ("golore_adamw", "refresh", "randomized", "optimizer.refresh='randomized': golore_adamw"),
    ("q_galore_adamw", "basis_group_size", 3, "optimizer.basis_group_size must be a positive even int"),
    ("q_galore_adamw", "basis_group_size", 1 << 20, r"optimizer.basis_group_size=1048576: basis_dtype='int4' at "
     r"'layers/0/\w+/\w+/kernel'"),
])
def test_bad_family_values_are_refused(name, key, value, needle):
  cfg = make_config(name=name, **{key: value})
  with pytest.raises(config.ConfigError, match=needle):
    config.validate(cfg)


def test_golore_and_q_galore_options():
  """GoLore carries the first moment and switches at 80% of train.steps unless told; Q-GaLore has int4 bases and
  the adaptive gap whatever basis_dtype / adaptive_gap say."""
  golore = make_config(name="golore_adamw")
  config.resolve(golore)
  assert golore.optimizer.golore_switch_step == int(0.8 * golore.train.steps)
  assert config.optimizer_options(golore.optimizer)["on_refresh"] == "project_first"
  config.validate(golore)
  assert config.reports_overlap(golore)
  q = make_config(name="q_galore_adamw", basis_group_size=16)
  options = config.optimizer_options(q.optimizer)
  assert options["basis_dtype"] == "int4" and options["adaptive_gap"] is not None
  config.validate(q)


def test_apollo_options_come_from_its_own_keys():
  """APOLLO's scale and projection are its own keys (GaLore's α and refresh mean other things); APOLLO-Mini is
  rank 1."""
  mini = config.optimizer_options(make_config(name="apollo_mini", scale=0.25, refresh="svd").optimizer)
  assert mini["rank"] == 1 and mini["refresh"] == "random" and "scale" not in mini  # the alias's 128
  apollo = make_config(name="apollo_adamw", apollo_scale=2.0, apollo_proj="svd")
  options = config.optimizer_options(apollo.optimizer)
  assert (options["rank"], options["scale"], options["refresh"]) == (4, 2.0, "svd")
  assert config.reports_overlap(apollo)  # SVD bases are orthonormal: their overlap means something
  assert not config.reports_overlap(make_config(name="apollo_mini"))
  assert config.optimizer_options(make_config(name="fira_adamw", scale=0.5).optimizer)["scale"] == 0.5
