"""Each bench script run end to end on tiny shapes (one repeat), its results file checked against its own arithmetic.

The device script (bench/gpu_7b.sh) runs every one of its parts on tiny presets, so that a device session never
finds it broken.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from bench import (
    adam8bit_chunks,
    common,
    compile_7b,
    compile_time,
    data_pipeline,
    exact_refresh,
    family_memory,
    memory,
    refresh,
    refresh_parts,
    report,
    sharding_bytes,
    skip_nonfinite,
    skip_time,
    tiny_quality,
    xla_peak,
)


def test_data_pipeline_measures_both_starts_of_the_corpus_it_wrote(tmp_path, capsys):
  out = tmp_path / "data.json"
  record = data_pipeline.main(["--megabytes", "1", "--vocab", "300", "--seq_len", "64", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  documents = data_pipeline.write_corpus(str(tmp_path / "same.jsonl"), 1)  # the same seed, so the same corpus
  assert record["stats"]["train_documents"] + record["stats"]["val_documents"] == documents
  assert record["corpus_bytes"] == os.path.getsize(tmp_path / "same.jsonl") > 1_000_000
  assert record["stats"]["vocab_size"] <= 300 and record["stats"]["train_tokens"] > 0
  for phase in record["phases"].values():
    assert phase["data_rss_gb"] == pytest.approx(phase["peak_rss_gb"] - phase["import_rss_gb"])
  with pytest.raises(SystemExit, match="^2$"):
    data_pipeline.main(["--corpus", str(tmp_path / "missing")])
  assert capsys.readouterr().err.endswith(f"error: --corpus '{tmp_path / 'missing'}' does not exist\n")


def test_compile_time_ratios_are_against_adamw(tmp_path):
  out = tmp_path / "compile_time.json"
  record = compile_time.main(["--preset", "llama_9m", "--vocab", "64", "--seq_len", "8", "--variants", "galore svd",
                              "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  results = record["results"]
  assert list(results) == ["adamw", "galore svd"] and record["kernels"] == 4 * 7 and record["rank"] == 32
  assert results["galore svd"]["ratio_to_adamw"] == pytest.approx(results["galore svd"]["compile_s"] /
                                                                   results["adamw"]["compile_s"])
  assert record["command"] == "python -m bench.compile_time --preset llama_9m --vocab 64 --seq_len 8 --variants " \
                              "'galore svd' --out " + str(out)
  assert {"jax", "jaxlib", "optax", "flax", "python"} <= set(record["versions"])


def test_compile_7b_at_the_configured_batch_compiles_its_micro_batch_loop(tmp_path):
  out = tmp_path / "compile-7b.json"
  record = compile_7b.main(["--layers", "1", "--configured_batch", "--variants", "adamw", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  assert (record["tokens_per_step"], record["micro_batches"]) == (512 * 256, 64)
  assert record["config"] == "configs/llama7b.py with train.batch_size=512, train.grad_accum=64"
  adamw = record["results"]["adamw"]
  assert adamw["ratio_to_adamw"] == 1.0 and adamw["total_s"] == adamw["total_s_rounds"][0]
  # the 64 micro-batches run one at a time: the temporaries hold one micro-batch's bf16 logits, not all 64's
  assert 8 * 256 * 32000 * 2 / 1e9 < adamw["xla_temp_gb"] < 64 * 8 * 256 * 32000 * 2 / 1e9


def test_memory_analytic_total_is_the_sum_of_its_parts(tmp_path):
  out = tmp_path / "memory"
  results = memory.main(["--presets", "llama_9m", "--tokens", "64", "--analytic_only", "--variants",
                         "adamw (bf16 states),galore_adamw_8bit + layerwise", "--out", str(out)])
  assert json.load(open(f"{out}.json"))["results"] == results and os.path.exists(f"{out}.png")
  adamw, galore = results
  for r in results:
    parts = r["weights_gb"] + r["gradients_gb"] + r["optimizer_state_gb"] + r["activations_estimate_gb"]
    assert r["analytic_total_gb"] == pytest.approx(parts) and r["tokens_per_step"] == 64
    assert r["tokens_in_24gb"] == r["sequences_in_24gb"] * 64
    assert r["optimizer_state_gb"] == pytest.approx(r["moments_low_rank_gb"] + r["projector_bases_gb"] +
                                                    r["full_rank_states_gb"])
  assert galore["gradients_gb"] < adamw["gradients_gb"] and galore["optimizer_state_gb"] < adamw["optimizer_state_gb"]


def test_memory_compiled_for_an_h100_is_the_gpu_buffer_assignment(tmp_path):
  """--compile_for h100 on this CPU: XLA's CUDA compiler (sm_90 code, its buffer assignment dumped), the arguments
  exactly the weights, the optimizer state and the batch, and the values live at the dumped schedule's peak
  within XLA's peak."""
  out, dump = tmp_path / "memory", tmp_path / "dump"
  r, = memory.main(["--compile_for", "h100", "--presets", "llama_9m", "--tokens", "64", "--layers", "1",
                    "--scan_layers", "--variants", "galore_adamw_8bit + layerwise", "--xla_dump", str(dump),
                    "--out", str(out)])
  assert "error" not in r, r.get("error")
  assert (r["backend"], r["device"]) == ("gpu", "NVIDIA H100 80GB HBM3")
  batch_bytes = 5 * 64 * 4  # inputs, targets, loss_mask, segment_ids, positions: one sequence of 64, 4 bytes each
  assert round(r["xla_argument_gb"] * 1e9) == round((r["weights_gb"] + r["optimizer_state_gb"]) * 1e9) + batch_bytes
  assert json.load(open(f"{out}.json"))["compiled_for"].startswith("h100 ")
  folder, = os.listdir(dump)
  assert any(f.endswith("sm_9.0a_gpu_after_optimizations-buffer-assignment.txt") for f in os.listdir(dump / folder))
  row, = xla_peak.from_dump(str(dump), top=4)
  assert 0 < row["live_at_peak_gb"] <= r["xla_peak_gb"]


def test_config_memory_compiles_a_config_file_for_an_h100_at_each_batch(tmp_path):
  """configs/tiny.py compiled for an H100 at 2 and 4 sequences: the arguments differ by the two more sequences'
  five int32/fp32 batch arrays exactly, the temporaries grow with the batch."""
  from bench import config_memory

  record = config_memory.main(["--config", "configs/tiny.py", "--compile_for", "h100", "--sequences", "2", "4",
                               "--out", str(tmp_path / "cm.json")])
  two, four = record["results"]
  assert "error" not in two and "error" not in four, record["results"]
  assert (two["backend"], two["device"]) == ("gpu", "NVIDIA H100 80GB HBM3")
  seq_len = two["tokens_per_step"] // 2
  assert round((four["xla_argument_gb"] - two["xla_argument_gb"]) * 1e9) == 2 * seq_len * 5 * 4
  assert four["xla_temp_gb"] > two["xla_temp_gb"] and four["tokens_per_step"] == 4 * seq_len
  assert json.load(open(tmp_path / "cm.json")) == record


def test_skipping_nonfinite_steps_by_a_select_adds_no_temporaries_at_7b_width(tmp_path):
  """bench.skip_nonfinite's figures, and the reason train.nonfinite="skip" selects inside the optimizer: at Llama-7B
  width (2 layers, GaLore with fp32 moments) the guarded step needs the unguarded step's temporaries (selected after
  the update it needed 1.2 GB more on CPU, a lax.cond around the update 1.4 GB more)."""
  out = tmp_path / "skip.json"
  record = skip_nonfinite.main(["--cases", "llama_9m:2:scanned", "llama_7b:2:unrolled", "--variants",
                                "galore_adamw (fp32 states)", "--out", str(out)])
  assert json.load(open(out))["results"] == record["results"]
  tiny, wide = record["results"]
  assert (tiny["preset"], tiny["layers"], tiny["layout"]) == ("llama_9m", 2, "scanned")
  for r in record["results"]:
    for guard in ("select", "cond"):
      assert r[f"{guard}_extra_gb"] == pytest.approx(r[f"{guard}_temp_gb"] - r["unguarded_temp_gb"])
      assert r[f"{guard}_peak_gb"] > r["params_gb"] + r["optimizer_state_gb"]
  assert wide["unguarded_temp_gb"] > 1 and abs(wide["select_extra_gb"]) <= 0.01 * wide["unguarded_temp_gb"]
  assert wide["cond_extra_gb"] > 0.1 * wide["unguarded_temp_gb"]


def test_skip_nonfinite_compiles_a_layerwise_step_without_a_cond(tmp_path):
  """The paper's 8-bit + layerwise step at Llama-7B width (1 layer): skipping costs no temporaries, as the 8-bit
  moments are selected before their requantization (selected after it, 0.079 GB more on CPU)."""
  record = skip_nonfinite.main(["--cases", "llama_7b:1:unrolled", "--variants", "galore_adamw_8bit + layerwise",
                                "--out", str(tmp_path / "skip.json")])
  (row,) = record["results"]
  assert row["cond_extra_gb"] is None and "cond_temp_gb" not in row
  assert row["select_extra_gb"] == pytest.approx(row["select_temp_gb"] - row["unguarded_temp_gb"])
  assert row["unguarded_temp_gb"] > 1 and abs(row["select_extra_gb"]) <= 0.001 * row["unguarded_temp_gb"]


def test_adam8bit_chunks_measures_each_chunk_size_side_by_side(tmp_path):
  out = tmp_path / "chunks.json"
  record = adam8bit_chunks.main(["--shape", "64", "1024", "--dtypes", "bfloat16", "--chunk_sizes", "0", "4096",
                                 "--rounds", "2", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  whole, chunked = record["results"]
  assert (whole["chunk_size"], chunked["chunk_size"]) == (0, 4096)
  assert whole["update_s"]["n"] == chunked["update_s"]["n"] == 6
  assert chunked["vs_chunk_size_0"] == pytest.approx(chunked["update_s"]["median"] / whole["update_s"]["median"])
  assert chunked["temp_gb"] < whole["temp_gb"]  # 16 chunks of 4096 elements against the whole 64x1024 leaf


def test_adam8bit_chunks_refuses_a_chunk_smaller_than_a_block(capsys):
  with pytest.raises(SystemExit) as exit_info:
    adam8bit_chunks.main(["--chunk_sizes", "0", "100"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip() == ("error: --chunk_sizes [0, 100]: each is 0 (the whole leaf) or at least a "
                                             "block (256)")


def test_skip_time_times_the_three_steps_side_by_side(tmp_path):
  out = tmp_path / "skip_time.json"
  record = skip_time.main(["--preset", "llama_9m", "--tokens", "64", "--variants", "galore_adamw (fp32 states)",
                           "--rounds", "2", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  (row,) = record["results"]
  for guard in skip_time.GUARDS:
    assert row[f"{guard}_s"]["n"] == 6 and row[f"{guard}_s"]["min"] > 0
  assert row["inside_vs_unguarded"] == pytest.approx(row["inside_s"]["median"] / row["unguarded_s"]["median"])


def test_family_memory_splits_each_state_into_its_parts(tmp_path):
  out = tmp_path / "family.json"
  record = family_memory.main(["--presets", "llama_1b", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  rows = {r["variant"]: r for r in record["results"]}
  for r in rows.values():
    assert r["optimizer_state_gb"] == pytest.approx(r["moments_low_rank_gb"] + r["projector_bases_gb"] +
                                                    r["rule_states_gb"] + r["full_rank_states_gb"])
  galore, fira = rows["galore_adamw (bf16 states)"], rows["fira_adamw (bf16 states)"]
  assert 0 < fira["rule_states_gb"] < 1e-6 and fira["moments_low_rank_gb"] == galore["moments_low_rank_gb"]
  assert rows["apollo_mini (bf16 states)"]["projected_matrices_gb"] < 0.01 * galore["projected_matrices_gb"]


def test_refresh_writes_each_phase_before_the_next_and_scales_to_the_model(tmp_path, monkeypatch):
  out = tmp_path / "refresh.json"
  timing, train_compare = refresh.timing, refresh.train_compare

  def after_quality(*args, **kwargs):  # a failure from here on keeps the quality figures (issue 20)
    written = json.load(open(out))
    assert written["quality_real_gradients"]["summary"] and written["timing"] is None
    return timing(*args, **kwargs)

  def after_timing(*args, **kwargs):
    written = json.load(open(out))
    assert written["timing"]["results"]["svd"] and written["training"] is None
    return train_compare(*args, **kwargs)

  monkeypatch.setattr(refresh, "timing", after_quality)
  monkeypatch.setattr(refresh, "train_compare", after_timing)
  # two layers: the batched randomized refresh runs too (it once deadlocked XLA:CPU, tests/optim/test_linalg.py)
  record = refresh.main(["--preset", "llama_9m", "--layers", "2", "--fast", "randomized", "--model",
                         "llama_9m", "--quality_steps", "2", "--train_steps", "1", "--train_refreshes",
                         "svd,randomized", "--repeats", "1", "--max_bytes", "30000", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  timings, final = record["timing"]["results"], record["final"]
  assert list(timings) == ["randomized", "randomized+batch_refresh", "svd"]
  assert final["exact_s"] == timings["svd"]["refresh_s"] and final["fast_s"] == timings["randomized"]["refresh_s"]
  assert final["speedup"] == pytest.approx(final["exact_s"] / final["fast_s"])
  assert final["exact_s_4_layers"] == pytest.approx(2 * final["exact_s"])  # llama_9m has 4 layers, 2 were timed
  assert final["fast_batched_s_4_layers"] == pytest.approx(2 * timings["randomized+batch_refresh"]["refresh_s"])
  assert final["full_model_is_extrapolated"] == {"exact": True, "fast": True}
  assert 0.9 < timings["randomized"]["min_energy_ratio"] <= 1 + 1e-5
  quality = record["quality_real_gradients"]["summary"]["randomized"]
  assert quality["min_energy_ratio"] <= quality["mean_energy_ratio"] and 0 < quality["min_overlap"] <= 1 + 1e-5
  assert final["min_energy_ratio"] == min(timings["randomized"]["min_energy_ratio"], quality["min_energy_ratio"])
  training = record["training"]
  assert training["svd"]["eval_loss_rel_diff"] == 0 and training["randomized"]["eval_loss_rel_diff"] == pytest.approx(
      training["randomized"]["eval_loss"] / training["svd"]["eval_loss"] - 1)


def test_exact_refresh_totals_add_up(tmp_path, monkeypatch):
  """The script on stand-in gradients (training a model to get real ones is bench/refresh.py's, smoke-tested above):
  the per-shape timings sum to the model's, the summary is the record's, the file is what main returns."""
  import jax
  import jax.numpy as jnp

  def stand_in(preset, n_steps, max_bytes, later):
    def grads(seed):
      keys = jax.random.split(jax.random.key(seed), 3)
      return {"attn": {"a": jax.random.normal(keys[0], (8, 12)), "b": jax.random.normal(keys[1], (8, 12))},
              "mlp": {"c": jax.random.normal(keys[2], (12, 8))}, "norm": jnp.ones(8)}

    return grads(0), grads(1) if later else None, 1.0

  monkeypatch.setattr(exact_refresh, "real_gradients", stand_in)
  out = tmp_path / "exact.json"
  record = exact_refresh.main(["--preset", "llama_9m", "--rank", "3", "--repeats", "1", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  real = record["real_gradients"]
  assert real["matrices"] == 3 and sorted(x["matrices"] for x in real["timing_by_shape"]) == [1, 2]
  for key in ("gram_s", "svd_s"):
    assert real["model_refresh_s"][key] == pytest.approx(sum(x[key] * x["matrices"] for x in real["timing_by_shape"]))
  assert real["model_speedup"] == pytest.approx(real["model_refresh_s"]["svd_s"] / real["model_refresh_s"]["gram_s"])
  assert 0.9999 <= real["min_energy_ratio"] <= 1 + 1e-5 and real["max_projector_diff"] < 1e-4
  assert record["summary"]["model_speedup"] == real["model_speedup"] and record["shapes"] is None
  assert real["min_later_energy_ratio"] == min(r["later_energy_ratio"] for r in real["per_matrix"]) > 0.5


def test_refresh_parts_model_totals_add_up(tmp_path):
  record = refresh_parts.main(["--preset", "llama_9m", "--repeats", "1", "--out", str(tmp_path / "parts.json")])
  assert sorted((tuple(r["shape"]), r["count"]) for r in record["results"]) == [((128, 128), 16), ((128, 352), 8),
                                                                               ((352, 128), 4)]
  assert record["model_refresh_s"] == pytest.approx(sum(r["count"] * r["seconds"]["whole randomized refresh"]
                                                        for r in record["results"]))
  assert record["model_exact_svd_s"] == pytest.approx(sum(r["count"] * r["seconds"]["exact svd"]
                                                          for r in record["results"]))


def test_refresh_parts_of_the_exact_refresh_add_up_and_render(tmp_path):
  out = tmp_path / "parts-exact.json"
  record = refresh_parts.main(["--preset", "llama_9m", "--repeats", "1", "--parts", "exact", "--out", str(out)])
  assert json.load(open(out)) == json.loads(json.dumps(record))
  rows = record["results"]
  assert [sorted(r) for r in rows] == [["count", "exact_seconds", "shape"]] * 3  # no randomized kernels timed
  for key, part in (("model_exact_gram_s", refresh_parts.DEFAULT_GRAM),
                    ("model_exact_gram_no_deflation_s", "whole gram refresh, no deflation"),
                    ("model_exact_svd_s", "exact svd")):
    assert record[key] == pytest.approx(sum(r["count"] * r["exact_seconds"][part] for r in rows))
  assert {"eigh [128,128]", "eigh batched x4 [128,128], per matrix"} <= set(rows[0]["exact_seconds"])
  assert "qr [352,32]" in rows[1]["exact_seconds"]
  table = report.exact_parts_table(record)
  assert table[0].startswith("**Exact refresh kernel by kernel**, llama_9m (rank 32)")
  assert [line.split(" | ")[:2] for line in table[4:7]] == [["| 128×128", "16"], ["| 352×128", "4"], ["| 128×352", "8"]]


def test_sharding_bytes_split_the_state_over_fsdp(tmp_path):
  record = sharding_bytes.main(["--configs", "tiny", "--fsdp", "1", "2", "--out", str(tmp_path / "sharding.json")])
  rows = {(r["optimizer"], r["fsdp"]): r for r in record["rows"]}
  for optimizer in sharding_bytes.OPTIMIZERS:
    whole, split = rows[optimizer, 1], rows[optimizer, 2]
    assert whole["opt_state_bytes_per_device"] == whole["opt_state_bytes_total"]
    assert whole["opt_state_bytes_total"] / 2 <= split["opt_state_bytes_per_device"] < whole["opt_state_bytes_total"]
  assert rows["galore_adamw", 1]["opt_state_bytes_total"] < rows["adamw", 1]["opt_state_bytes_total"]


def test_tiny_quality_runs_train_py_and_compares_against_the_same_seed(tmp_path):
  workdir = tmp_path / "runs"
  for name, loss in (("svd_s1", 4.0), ("randomized_s1", 4.2)):  # finished runs (step 1 of 1) are read, not repeated
    os.makedirs(workdir / name)
    (workdir / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": loss}) + "\n")
  record = tiny_quality.main(["--seeds", "0", "1", "--variants", "svd", "randomized", "--workdir", str(workdir),
                              "--set", "train.steps=1", "--set", "data.max_bytes=30000", "--set",
                              "model.num_hidden_layers=1", "--set", "eval.batches=1", "--out",
                              str(tmp_path / "quality.json")])
  runs = record["runs"]
  assert list(runs) == ["svd_s0", "randomized_s0", "svd_s1", "randomized_s1"]
  assert all(math.isfinite(r["eval_loss"]) for r in runs.values())
  assert runs["randomized_s1"]["rel_diff_to_svd_same_seed"] == pytest.approx(0.05)
  assert runs["randomized_s0"]["rel_diff_to_svd_same_seed"] == pytest.approx(
      runs["randomized_s0"]["eval_loss"] / runs["svd_s0"]["eval_loss"] - 1)
  baselines = [runs["svd_s0"]["eval_loss"], 4.0]
  assert record["svd_seed_spread"] == pytest.approx(max(baselines) / min(baselines) - 1)


def test_tiny_quality_counts_only_the_eval_at_the_last_step(tmp_path):
  """A run stopped after an intermediate eval (here step 100 of 400) is not finished: its eval loss is not the
  result, and the run is started again (train.py resumes it)."""
  rows = [{"step": 100, "eval_loss": 6.0}, {"step": 110, "loss": 5.6}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert tiny_quality.final_eval_loss(str(tmp_path)) is None and tiny_quality.final_eval_loss(str(tmp_path), 100) == 6.0
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 400, "eval_loss": 4.4}) + "\n")
  assert tiny_quality.final_eval_loss(str(tmp_path)) == 4.4
  assert tiny_quality.parse(["--set", "train.steps=7", "--set", "seed=1"]).steps == 7
  assert tiny_quality.parse([]).steps == tiny_quality.STEPS == 400


def test_report_renders_the_gpu_memory_list_with_the_layout_and_failures(tmp_path, monkeypatch):
  """memory-7b-gpu.json (bench/memory.py --real_step's flat list): one row per variant, its stacked layers named,
  the bytes in use before the step beside the peak, and a variant that failed shows its error."""
  rows = [{"preset": "llama_7b", "variant": "galore_adamw_8bit + layerwise", "scan_layers": True, "tokens": 256,
           "analytic_total_gb": 19.76, "xla_peak_gb": 21.5, "device_in_use_before_step_gb": 19.1,
           "device_peak_gb": 20.25, "date": "2026-12-07", "command": "python -m bench.memory"},
          {"preset": "llama_7b", "variant": "adamw (bf16 states)", "scan_layers": True, "tokens": 256,
           "error": "RESOURCE_EXHAUSTED: Out of memory", "date": "2026-12-07", "command": "python -m bench.memory"}]
  (tmp_path / "memory-7b-gpu.json").write_text(json.dumps(rows))
  monkeypatch.setattr(common, "RESULTS", str(tmp_path))
  text = "\n".join(report.memory_section())
  assert "| llama_7b | galore_adamw_8bit + layerwise, scanned layers | 256 | 19.76 GB | 21.50 GB | 19.10 GB | " \
         "20.25 GB |" in text
  assert "| llama_7b | adamw (bf16 states), scanned layers | 256 | – | – | – | RESOURCE_EXHAUSTED: Out of memory |" \
         in text


def test_report_renders_every_committed_result_between_the_markers(tmp_path):
  page = tmp_path / "performance.md"
  intro = "# Performance\n\nHand-written intro.\n\n"
  page.write_text(intro + report.BEGIN + "\nold tables\n" + report.END + "\ntail\n")
  report.main(["--out", str(page)])
  text = page.read_text()
  assert text.startswith(intro + report.BEGIN) and text.endswith(report.END + "\ntail\n")
  assert "old tables" not in text
  for name in os.listdir(common.RESULTS):
    if name.endswith(".json") and not name.startswith("sharding") and not name.endswith("-full.json"):
      assert f"bench/results/{name}" in text, name


def test_gpu_7b_runs_every_part_on_tiny_shapes(tmp_path):
  """bench/gpu_7b.sh end to end: memory (real steps), refresh and train.py, each result file written."""
  env = dict(os.environ, GPU_7B_TINY="1", OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  done = subprocess.run(["bash", os.path.join(common.ROOT, "bench", "gpu_7b.sh")], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0 and done.stdout.count(": exit code 0 at") == 3, done.stdout[-3000:] + done.stderr[-3000:]
  flat = json.load(open(tmp_path / "memory-7b-gpu.json"))  # tiny: the first variant (the full list: test_arguments)
  assert [r["variant"] for r in flat] == ["galore_adamw_8bit + layerwise"] and flat[0]["layerwise"]
  assert flat[0]["scan_layers"] and flat[0]["device_in_use_before_step_gb"] == 0  # CPU keeps no allocator stats
  assert all("device_peak_gb" in r and r["analytic_total_gb"] > 0 and r["tokens"] == 64 for r in flat)
  assert json.load(open(tmp_path / "memory-7b-gpu-full.json"))["command"].startswith("python -m bench.memory")
  # the variant's train step as XLA compiled it, packed to come back from the device, and read here
  (dumped,) = xla_peak.from_dump(str(tmp_path / "xla-dump-memory-7b.tgz"), top=4)
  assert dumped["dump"].startswith("llama_9m_galore_adamw_8bit_layerwise/") and "train" in dumped["dump"]
  assert 0 < sum(g["gb"] for g in dumped["peak_groups"]) <= dumped["live_at_peak_gb"]
  final = json.load(open(tmp_path / "refresh-gpu-llama_7b.json"))["final"]
  assert final["preset"] == "llama_9m" and final["speedup"] == pytest.approx(final["exact_s"] / final["fast_s"])
  assert final["direct_svd_s"] > 0 and final["direct_layers_timed"] == 1  # the direct SVD beside the Gram exact one
  train = json.load(open(tmp_path / "train-gpu-llama7b.json"))
  assert train["error"] is None and [r["step"] for r in train["metrics"]] == [1, 2]
  assert train["summary"]["tokens_per_sec"] == train["metrics"][1]["tokens_per_sec"]
  assert train["tokens_per_step"] == 2 * 128 and train["preset"] == "llama_20m"
