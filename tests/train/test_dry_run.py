"""train.py --dry_run: compiled on abstract shapes, memory report with the promised keys and exact state bytes."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from galore_jax.train import config, dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ("xla_peak_gb", "weights_gb", "optimizer_state_gb", "analytic_total_gb", "backend", "device",
        "moments_low_rank_gb", "projector_bases_gb", "full_rank_states_gb", "gradients_gb", "xla_temp_gb")


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
  h, f, q, kv = m.hidden_size, m.intermediate_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
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
  galore = dry_run.dry_run(small_config(rank=8))
  adamw = dry_run.dry_run(small_config(name="adamw"))
  assert adamw["optimizer_state_gb"] * 1e9 == pytest.approx(2 * adamw["weights_gb"] * 1e9 + 8, abs=0.5)  # + 2 counts
  assert galore["optimizer_state_gb"] < adamw["optimizer_state_gb"]
  assert adamw["moments_low_rank_gb"] == 0 and adamw["projector_bases_gb"] == 0


@pytest.mark.slow
def test_command_line_prints_json_last_and_writes_nothing(tmp_path):
  workdir = tmp_path / "never"
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", "--dry_run", f"--config.workdir={workdir}",
       "--config.model.num_hidden_layers=2", "--config.train.batch_size=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert all(key in report for key in KEYS)
  assert "XLA peak" in result.stdout
  assert not workdir.exists()
