"""train.py --dry_run: the analytic memory report in seconds (Llama-7B included), --dry_run_compile with XLA's figures
of the step compiled on abstract shapes; the promised keys and exact state bytes."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import llama7b, llama7b_24gb, tiny
from galore_jax.train import config, dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANALYTIC_KEYS = ("weights_gb", "optimizer_state_gb", "analytic_total_gb", "backend", "device", "moments_low_rank_gb",
                 "projector_bases_gb", "full_rank_states_gb", "gradients_gb", "activations_estimate_gb")
KEYS = ANALYTIC_KEYS + ("xla_peak_gb", "xla_temp_gb", "compile_s")


def small_config(**optimizer):
  cfg = tiny.get_config()
  cfg.model.num_hidden_layers = 2
  cfg.train.batch_size = 4
  cfg.optimizer.update(optimizer)
  return cfg


def closed_form_state_bytes(cfg, rank=None) -> int:
  """Projector r·min(m,n) + moments 2·r·max(m,n) per targeted matrix, fp32 Adam for the rest, and three int32
  step counts (GaLore's, Adam's, the learning-rate schedule's)."""
  m = config.model_config(cfg)
  h, f, q, kv = (m.hidden_size, m.intermediate_size, m.num_attention_heads * m.head_dim,
                 m.num_key_value_heads * m.head_dim)
  r = cfg.optimizer.rank if rank is None else rank
  matrices = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
  per_layer = sum(min(r, a, b) * min(a, b) + 2 * min(r, a, b) * max(a, b) for a, b in matrices)
  rest = 2 * (2 * m.vocab_size * h + (2 * m.num_hidden_layers + 1) * h)
  return 4 * (m.num_hidden_layers * per_layer + rest) + 4 * 3


def test_report_has_the_promised_keys_and_exact_state_bytes():
  cfg = small_config()
  report = dry_run.dry_run(cfg)
  for key in KEYS:
    assert key in report, key
  assert report["optimizer_state_gb"] * 1e9 == pytest.approx(closed_form_state_bytes(cfg), abs=0.5)
  assert report["optimizer_state_gb"] == pytest.approx(
      report["moments_low_rank_gb"] + report["projector_bases_gb"] + report["full_rank_states_gb"])
  assert report["xla_peak_gb"] > report["weights_gb"]
  assert "device_peak_gb" not in report  # CPU: no real step


def test_compiling_for_a_named_device_places_every_argument_on_it():
  """``device=`` (how bench/gpu_target.py compiles for a GPU that is not here) with this machine's own device gives
  the default dry run's figures: placing the abstract arguments changes nothing else."""
  import jax

  cfg = small_config()
  default, placed = dry_run.dry_run(cfg, real_step=False), dry_run.dry_run(cfg, device=jax.devices()[0])
  for key in ("xla_argument_gb", "xla_output_gb", "xla_alias_gb", "xla_temp_gb", "backend", "device"):
    assert placed[key] == default[key], key


def test_real_step_reports_the_bytes_in_use_before_it_and_the_peak_after_it(monkeypatch):
  """The allocator's figures (a GPU's; CPU keeps none, so they are scripted here): bytes in use from the first
  read (before the step), the peak from the second (after it), both in the printed report."""
  reads = []

  def stats():
    reads.append(len(reads))
    return {"bytes_in_use": 5 * 10**9, "peak_bytes_in_use": 7 * 10**9} if len(reads) == 1 else \
           {"bytes_in_use": 0, "peak_bytes_in_use": 9 * 10**9}

  monkeypatch.setattr(dry_run, "_memory_stats", stats)
  report = dry_run.dry_run(small_config(), real_step=True)
  assert reads == [0, 1]
  assert (report["device_in_use_before_step_gb"], report["device_peak_gb"]) == (5.0, 9.0)
  assert re.search(r"\n  device in use before the real step +5\.00 GB\n  device peak, one real step +9\.00 GB",
                   dry_run.format_report(report))


@pytest.mark.parametrize("name,rank", [("fira_adamw", 64), ("apollo_adamw", 64), ("apollo_mini", 1)])
def test_family_state_bytes_are_galores_plus_a_limiter_norm_per_matrix(name, rank):
  """Fira and APOLLO keep GaLore's state (APOLLO-Mini at rank 1 whatever optimizer.rank says), one fp32 limiter
  norm per projected matrix (7 per layer) and one more step count (the bias correction's)."""
  cfg = small_config(name=name)
  report = dry_run.analytic(cfg)
  limiter = 4 * 7 * config.model_config(cfg).num_hidden_layers
  assert report["rank"] == rank
  assert report["optimizer_state_gb"] * 1e9 == pytest.approx(closed_form_state_bytes(cfg, rank) + 4 + limiter, abs=0.5)
  assert report["rule_states_gb"] * 1e9 == pytest.approx(limiter, abs=0.5)


def test_galore_state_is_smaller_than_adamw_state():
  galore = dry_run.dry_run(small_config(rank=8), compile=False)
  adamw = dry_run.dry_run(small_config(name="adamw"), compile=False)
  assert adamw["optimizer_state_gb"] * 1e9 == pytest.approx(2 * adamw["weights_gb"] * 1e9 + 8, abs=0.5)  # + 2 counts
  assert galore["optimizer_state_gb"] < adamw["optimizer_state_gb"]
  assert adamw["moments_low_rank_gb"] == 0 and adamw["projector_bases_gb"] == 0


def test_analytic_report_compiles_nothing_and_agrees_with_the_compiled_one():
  cfg = small_config()
  analytic, compiled = dry_run.dry_run(cfg, compile=False), dry_run.dry_run(cfg)
  assert all(key in analytic for key in ANALYTIC_KEYS) and not any(k.startswith("xla_") for k in analytic)
  assert "compile_s" not in analytic and "analytic (--dry_run_compile" in dry_run.format_report(analytic)
  assert all(analytic[k] == compiled[k] for k in ANALYTIC_KEYS)


def test_layerwise_activations_count_every_micro_batch_layer_inputs():
  """Layerwise updates keep every layer's input (and the cotangents in and out of the current layer) for every
  micro-batch: with micro-batches of the same size, each added one adds (L + 2)·b·S·D values; the whole-tree
  step's estimate depends on the micro-batch only."""
  cfg = small_config()
  m = config.model_config(cfg)

  def estimate(batch_size, grad_accum, layerwise):
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.layerwise = batch_size, grad_accum, layerwise
    return dry_run.activation_estimate(cfg, m)

  one_micro_batch = (m.num_hidden_layers + 2) * 2 * cfg.data.seq_len * m.hidden_size * 4  # b = 2, fp32
  assert estimate(8, 4, True) - estimate(2, 1, True) == 3 * one_micro_batch
  assert estimate(8, 4, False) == estimate(2, 1, False)


@pytest.mark.parametrize("module", [llama7b, llama7b_24gb], ids=["llama7b", "llama7b_24gb"])
def test_llama7b_configs_analytic_report(module):
  cfg = module.get_config()
  checked = cfg.copy_and_resolve_references()
  del checked["mesh"]  # layerwise runs on one device; this test process has eight
  config.validate(checked)
  report = dry_run.dry_run(cfg, compile=False)
  assert report["params"] == 6_738_415_616 and report["rank"] == 1024
  if module is llama7b_24gb:  # the recipe: 8-bit states, one layer's gradient, the largest batch within 24 GB
    assert report["gradients_gb"] < 0.5 and report["moments_low_rank_gb"] < 3.5
    assert report["analytic_total_gb"] <= 24.0
    assert cfg.train.batch_size == llama7b_24gb.SEQUENCES_PER_STEP == dry_run.sequences_that_fit(cfg, 24.0) > 0


@pytest.mark.parametrize("module", [llama7b, llama7b_24gb], ids=["llama7b", "llama7b_24gb"])
def test_llama7b_configs_never_reach_the_slow_gpu_svd(module):
  """The 7B configs' refresh, lowered for CUDA on this CPU (jax.export) on a 7B layer's two kernel shapes: no
  cuSOLVER SVD (gesvd takes minutes for a 7B refresh, and the first step refreshes). The direct SVD's does."""
  import jax
  import jax.numpy as jnp

  from tests.optim.helpers import gpu_solver_calls

  kernel = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  params = {"layers": {"0": {"attn": {"q_proj": {"kernel": kernel(4096, 4096)}},
                             "mlp": {"down_proj": {"kernel": kernel(11008, 4096)}}}}}

  def solvers(refresh):
    cfg = module.get_config()
    cfg.train.layerwise, cfg.optimizer.refresh = False, refresh  # the whole-tree step refreshes alike
    tx = config.build_optimizer(cfg)
    return {target for target, _ in gpu_solver_calls(tx.update, params, jax.eval_shape(tx.init, params), params)}

  assert not any("gesvd" in target for target in solvers(module.get_config().optimizer.refresh))
  assert "cusolver_gesvd_ffi" in solvers("svd")


def run_train_py(tmp_path, flag):
  workdir = tmp_path / "never"
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", flag, f"--config.workdir={workdir}",
       "--config.model.num_hidden_layers=2", "--config.train.batch_size=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert not workdir.exists()
  return result.stdout, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_fine_tune_recipe_is_sized_before_its_checkpoint_is_downloaded(tmp_path):
  """configs/llama3_8b_finetune.py names a checkpoint directory that is not there yet: --dry_run sizes the
  config's preset, says so, and counts Llama-3-8B's parameters."""
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/llama3_8b_finetune.py", "--dry_run",
       f"--config.model.hf_checkpoint={tmp_path / 'not_yet'}", f"--config.workdir={tmp_path / 'never'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == (f"model.hf_checkpoint '{tmp_path / 'not_yet'}' has no config.json: the dry run sizes the "
                      "preset 'llama3_8b' instead")
  assert json.loads(lines[-1])["params"] == 8_030_261_248 and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_command_line_prints_json_last_and_writes_nothing(tmp_path):
  stdout, report = run_train_py(tmp_path, "--dry_run")
  assert all(key in report for key in ANALYTIC_KEYS) and "XLA peak" not in stdout
  stdout, report = run_train_py(tmp_path, "--dry_run_compile")
  assert all(key in report for key in KEYS) and "XLA peak" in stdout
