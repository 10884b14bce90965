"""The benchmark scripts a device session runs, smoke-run on tiny shapes: a broken script costs GPU minutes.

Each run is checked against the arithmetic its results file claims (amortized step, ratios, tokens/s).
"""

import json
import math

import pytest

from bench import report, speed, step_time

GALORE = "galore_jax.galore_adamw(randomized) bf16 states"


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_speed_results_follow_from_the_timed_steps(tmp_path, scan_layers):
  out = tmp_path / "speed.json"
  speed.main(["--preset", "llama_9m", "--tokens", "128", "--seq_len", "64", "--steps", "2",
              "--only", f"adamw,{GALORE},optax.contrib.galore", "--out", str(out),
              *(["--scan_layers"] if scan_layers else [])])
  record = json.load(open(out))
  results = record["results"]
  expected = ["adamw", GALORE] + ([] if scan_layers else ["optax.contrib.galore"])  # contrib refuses batch axes
  assert list(results) == expected and record["scan_layers"] == scan_layers
  gap, adamw = record["update_proj_gap"], results["adamw"]
  for r in results.values():
    assert r["first_step_s"] > 0 and r["refresh_s"] > 0
    low, high = r["non_refresh_spread_s"]
    assert low <= r["non_refresh_s"] <= high
    assert r["amortized_s"] == pytest.approx((r["refresh_s"] + (gap - 1) * r["non_refresh_s"]) / gap)
    assert r["tokens_per_sec"] == pytest.approx(128 / r["amortized_s"])
    assert r["amortized_ratio_to_adamw"] == pytest.approx(r["amortized_s"] / adamw["amortized_s"])
    assert math.isfinite(r["final_loss"])
  assert record["command"].startswith("python -m bench.speed --preset llama_9m")


def test_step_time_without_refresh_steps_reports_the_other_steps_only(tmp_path):
  out = tmp_path / "step_time.json"
  step_time.main(["--preset", "llama_60m", "--layers", "1", "--dtype", "bfloat16", "--repeats", "2",
                  "--warmup", "0", "--refresh_repeats", "0", "--only", "galore_jax.galore_adamw bf16 states",
                  "--out", str(out)])
  record = json.load(open(out))
  results = record["results"]
  assert list(results) == ["adamw", "galore_jax.galore_adamw bf16 states"]
  for r in results.values():
    assert r["refresh_s"] is None and r["amortized_s"] is None and r["ratio_to_adamw"] is None
    assert r["non_refresh_ratio_to_adamw"] == pytest.approx(r["non_refresh_s"] / results["adamw"]["non_refresh_s"])
  # the model's parameter tree, its first layer only: embedding, lm_head, 7 kernels and 3 norms
  assert record["shapes"]["layers"] == 1 and record["shapes"]["preset_layers"] == 8
  assert record["params"] == 2 * 32000 * 512 + 4 * 512 * 512 + 3 * 512 * 1376 + 3 * 512


def test_report_renders_missing_refresh_figures_and_scanned_layers(monkeypatch):
  step_time = {"preset": "llama_1b", "params": 1.2e9, "dtype": "bfloat16",
               "shapes": {"layers": 24, "preset_layers": 24},
               "settings": {"rank": 512, "update_proj_gap": 200},
               "results": {"adamw": {"refresh_s": None, "non_refresh_s": 0.01, "ratio_to_adamw": None,
                                     "non_refresh_ratio_to_adamw": 1.0, "state_bytes": 2**30}}}
  speed = {"preset": "llama_1b", "scan_layers": True, "params": 1.3e9, "dtype": "bfloat16", "tokens_per_step": 8192,
           "rank": 512, "update_proj_gap": 200, "device": "H100",
           "results": {"adamw": {"refresh_s": 0.5, "non_refresh_s": 0.2, "amortized_s": 0.2, "tokens_per_sec": 4e4,
                                 "amortized_ratio_to_adamw": 1.0, "compile_s": 20.0}}}
  files = {"step_time-*.json": step_time, "speed-*.json": speed}
  monkeypatch.setattr(report, "load", lambda pattern: [(pattern, files[pattern])] if pattern in files else [])
  assert "| adamw | – | 0.0100 s | – | 1.00× |" in "\n".join(report.step_time_section())
  assert report.speed_section()[0].startswith("**Training step, llama_1b, scanned layers (1300.0M params")
