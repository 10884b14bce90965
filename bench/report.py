"""Regenerate the tables of docs/performance.md from the results files under bench/results/.

  python -m bench.report [--out docs/performance.md]

Rewrites the text between the PERFORMANCE markers of the page and keeps the hand-written text around them; a page
that does not exist yet is created with a one-line title above the markers.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from bench import common

ROOT = common.ROOT
BEGIN, END = "<!-- PERFORMANCE:BEGIN (python -m bench.report) -->", "<!-- PERFORMANCE:END -->"
NEW_PAGE = "# Performance\n\n"


def load(pattern: str) -> list[tuple[str, dict]]:
  paths = sorted(glob.glob(os.path.join(common.RESULTS, pattern)))
  return [(os.path.relpath(p, ROOT), json.load(open(p))) for p in paths]


def seconds(value: float | None, spec: str = ".2f") -> str:
  return "–" if value is None else f"{value:{spec}} s"


def provenance(path: str, record: dict) -> str:
  versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items() if v)
  device = record.get("device")
  if isinstance(device, dict):
    device = device.get("device_kind")
  commit = f", code {record['commit']}" if record.get("commit") else ""
  return (f"*{device} ({record.get('backend')}), {record.get('date')}{commit}, {versions}; `{record.get('command')}` → "
          f"`{path}`*")


def speed_section() -> list[str]:
  lines = []
  for path, r in load("speed-*.json"):
    layers = ", scanned layers" if r.get("scan_layers") else ""
    lines += [f"**Training step, {r['preset']}{layers} ({r['params'] / 1e6:.1f}M params, {r['dtype']}), "
              f"{r['tokens_per_step']} tokens/step, rank {r['rank']}, T = {r['update_proj_gap']}, "
              f"{r['device']}**", "",
              "| optimizer | first step | refresh step | other steps (median) | amortized | tokens/s | MFU | "
              "vs AdamW | vs galore-torch | compile |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["results"].items():
      torch_ratio = x.get("tokens_per_sec_ratio_to_galore_torch")
      mfu = x.get("mfu")
      compile_cell = f"{x['compile_s']:.0f} s" if x.get("compile_s") else ""
      first = f"{x['first_step_s']:.3f} s" if "first_step_s" in x else "(the refresh step)"
      lines.append(f"| {name} | {first} | {x['refresh_s']:.3f} s | {x['non_refresh_s']:.3f} s | "
                   f"{x['amortized_s']:.3f} s | {x['tokens_per_sec']:,.0f} | {'' if mfu is None else f'{mfu:.1%}'} | "
                   f"{x['amortized_ratio_to_adamw']:.3f}× | {'' if torch_ratio is None else f'{torch_ratio:.2f}×'} | "
                   f"{compile_cell} |")
    lines += [""] + ([f"Note: {r['note']}", ""] if r.get("note") else []) + [provenance(path, r), ""]
  return lines


def refresh_section() -> list[str]:
  lines = []
  for path, r in load("refresh-*.json"):
    f = r["final"]
    speedup = "–" if f.get("speedup") is None else f"{f['speedup']:.1f}×"
    energy = "–" if f.get("min_energy_ratio") is None else f"{f['min_energy_ratio']:.4f}"
    # files with a direct SVD beside it were measured after refresh="svd" became the Gram eigensolver
    exact = (f"exact SVD {seconds(f['exact_s'])}" if "direct_svd_s" not in f else
             f"exact (Gram eigh) {seconds(f['exact_s'])} (direct SVD {seconds(f['direct_svd_s'])})")
    lines += [f"**Subspace refresh** ({r['device']}): {exact} vs `{f['fast']}` "
              f"{seconds(f['fast_s'])} for {f['layers_timed']} layer(s) of {f.get('preset', 'llama_1b')} kernels "
              f"(speedup {speedup}), worst energy ratio {energy} of the exact top-r "
              "basis; per-variant numbers and real-gradient quality in the file.", "", provenance(path, r), ""]
  return lines


def refresh_parts_section() -> list[str]:
  lines = []
  for path, r in load("refresh_parts-*.json"):
    if "model_refresh_s" in r:
      lines += randomized_parts_table(r)
    if "model_exact_gram_s" in r:
      lines += exact_parts_table(r)
    lines += ([f"Note: {r['note']}", ""] if r.get("note") else []) + [provenance(path, r), ""]
  return lines


def randomized_parts_table(r: dict) -> list[str]:
  lines = [f"**Refresh kernel by kernel**, {r['preset']} (rank {r['rank']}, k = rank + {r['oversampling']}), "
           f"{r['device']}: one randomized refresh of every basis {r['model_refresh_s']:.2f} s one matrix at a "
           f"time" + ("" if "model_refresh_batched_finish_s" not in r else
                      f", {r['model_refresh_batched_finish_s']:.2f} s with the finish (small eigh) batched per "
                      "shape")
           + f" (exact SVD {r['model_exact_svd_s']:.2f} s)", "",
           "| kernel shape | matrices | whole refresh | sketch | finish: one matrix / batched, per matrix | "
           "exact SVD | largest kernels |", "|---|---|---|---|---|---|---|"]
  for x in r["results"]:
    sec = x["seconds"]
    kernels = sorted(((k, v) for k, v in sec.items() if v is not None
                      and not k.startswith(("whole", "exact", "sketch", "finish"))), key=lambda kv: -kv[1])[:3]
    batched = [v for k, v in sec.items() if k.startswith("finish batched") and v is not None]
    finish = f"{ms(sec.get('finish, one matrix'))} / {ms(min(batched) if batched else None)}"
    lines.append(f"| {x['shape'][0]}×{x['shape'][1]} | {x['count']} | {ms(sec['whole randomized refresh'])} | "
                 f"{ms(sec.get('sketch (everything that reads the gradient)'))} | {finish} | "
                 f"{sec['exact svd'] * 1e3:.0f} ms | " + ", ".join(f"{k} {ms(v)}" for k, v in kernels) + " |")
  return lines + [""]


def exact_parts_table(r: dict) -> list[str]:
  lines = [f"**Exact refresh kernel by kernel**, {r['preset']} (rank {r['rank']}), {r['device']}: the Gram "
           f"refresh of every basis {r['model_exact_gram_s']:.2f} s one matrix at a time "
           f"({r['model_exact_gram_no_deflation_s']:.2f} s without its deflated pass), the direct SVD "
           f"{r['model_exact_svd_s']:.2f} s", "",
           "| kernel shape | matrices | Gram A Aᵀ | eigh | eigh (Jacobi) | eigh batched, per matrix | QR of the long "
           "side | Gram refresh: no deflation / default | exact SVD |", "|---|---|---|---|---|---|---|---|---|"]
  for x in r["results"]:
    sec = x["exact_seconds"]
    pick = lambda start, end="": next((v for k, v in sec.items() if k.startswith(start) and k.endswith(end)), None)
    lines.append(f"| {x['shape'][0]}×{x['shape'][1]} | {x['count']} | {ms(pick('gram A'))} | {ms(pick('eigh ['))} | "
                 f"{ms(pick('eigh jacobi'))} | {ms(pick('eigh batched'))} | {ms(pick('qr ['))} | "
                 f"{ms(pick('whole gram refresh, no'))} / {ms(pick('whole gram refresh', '(default)'))} | "
                 f"{ms(sec['exact svd'])} |")
  return lines + [""]


def exact_refresh_section() -> list[str]:
  lines = []
  for path, r in load("exact_refresh-*.json"):
    real = r.get("real_gradients")
    if real:
      model = real["model_refresh_s"]
      passes = r.get("deflations", 0)  # files from before the deflated pass: one eigensolve
      method = "one Gram eigh" if not passes else f"Gram eigh + {passes} deflated pass{'es' * (passes > 1)}"
      lines += [f"**Exact refresh: {method} (`gram_basis(deflations={passes})`) vs direct SVD (`\"svd\"`)**, "
                f"real gradients of "
                f"{real['model']} after {real['steps']} steps, rank {real['rank']}, {r['device']}: one refresh of "
                f"all {real['matrices']} matrices {seconds(model['gram_s'], '.3f')} "
                f"vs {seconds(model['svd_s'], '.3f')} "
                f"({real['model_speedup']:.1f}×); worst energy ratio {real['min_energy_ratio']:.6f}, worst subspace "
                f"overlap {real['min_overlap']:.4f} (smallest σ_r/σ_1 {real['min_sigma_r_over_sigma_1']:.1e})"
                + ("" if not real.get("later_steps") else
                   f"; on the gradient {real['later_steps']} steps later the Gram basis captures "
                   f"≥ {real['min_later_energy_ratio']:.4f} (mean {real['mean_later_energy_ratio']:.4f}) of what "
                   "the SVD basis does"), "",
                "| kernel shape | matrices | Gram | batched, per matrix | direct SVD | speedup |",
                "|---|---|---|---|---|---|"]
      for x in real["timing_by_shape"]:
        lines.append(f"| {x['shape'][0]}×{x['shape'][1]} | {x['matrices']} | {ms(x['gram_s'])} | "
                     f"{ms(x.get('gram_batched_s'))} | {ms(x['svd_s'])} | {x['speedup']:.1f}× |")
      lines.append("")
    shapes = r.get("shapes")
    if shapes:
      lines += [f"{shapes['preset']} kernel shapes (rank {shapes['rank']}, one synthetic matrix each): "
                + ", ".join(f"{x['shape'][0]}×{x['shape'][1]} {ms(x['gram_s'])} vs {ms(x['svd_s'])} "
                            f"(energy ratio {x['energy_ratio']:.6f})" for x in shapes["by_shape"])
                + f"; a whole refresh extrapolated {seconds(shapes['model_refresh_s_extrapolated']['gram_s'])} vs "
                  f"{seconds(shapes['model_refresh_s_extrapolated']['svd_s'])}.", ""]
    lines += [provenance(path, r), ""]
  return lines


def quality_section() -> list[str]:
  lines = []
  for path, r in load("tiny_quality-*.json"):
    lines += [f"**Quality on {r['config']}**: final eval loss", "", "| run | eval loss | vs exact SVD, same seed |",
              "|---|---|---|"]
    for name, x in r["runs"].items():
      rel = x.get("rel_diff_to_svd_same_seed")
      lines.append(f"| {name} | {x['eval_loss']:.4f} | {'' if rel is None else f'{rel:+.2%}'} |")
    spread = r.get("svd_seed_spread")
    lines += ["", "" if spread is None else f"Seed-to-seed spread of the exact-SVD baseline: {spread:.2%}.", ""]
    lines += footer(path, r)
  return lines


def memory_section() -> list[str]:
  lines = []
  for path, r in load("memory-*.json"):
    if isinstance(r, list):  # the GPU list of bench/memory.py --real_step
      lines += ["**Memory of one real step on the GPU**", "",
                "| model | variant | tokens | analytic total (dry run) | XLA peak (GPU compile) | "
                "in use before the step | device peak (real step) |",
                "|---|---|---|---|---|---|---|"]
      gb = lambda x, key: f"{x[key]:.2f} GB" if x.get(key) is not None else "–"
      for x in r:
        peak = gb(x, "device_peak_gb") if x.get("device_peak_gb") is not None else x.get("error", "–")
        variant = x.get("variant", "") + (", scanned layers" if x.get("scan_layers") else "")
        lines.append(f"| {x.get('preset')} | {variant} | {x.get('tokens')} | {gb(x, 'analytic_total_gb')} | "
                     f"{gb(x, 'xla_peak_gb')} | {gb(x, 'device_in_use_before_step_gb')} | {peak} |")
      lines += ["", provenance(path, r[0]) if r else "", ""]
      continue
    if path.endswith("-full.json"):
      continue
    if r.get("compiled_for"):
      lines += compiled_for_gpu(path, r)
      continue
    fit = next((k for x in r["results"] for k in x if k.startswith("tokens_in_")), None)
    fit_header = f" tokens in {fit[len('tokens_in_'):-2]} GB |" if fit else ""
    stacked = "; layers stacked, one lax.scan" if any(x.get("scan_layers") for x in r["results"]) else ""
    lines += [f"**Memory at 256 tokens/step (dry run: nothing allocated{stacked})**", "",
              "| model | optimizer | optimizer state | gradients alive | analytic total | XLA peak |" + fit_header,
              "|---|---|---|---|---|---|" + ("---|" if fit else "")]
    for x in r["results"]:
      variant = x.get("variant") or x["optimizer"] + (" + layerwise" if x.get("layerwise") else "")
      xla = f"{x['xla_peak_gb']:.2f} GB" if "xla_peak_gb" in x else "not compiled"
      lines.append(f"| {x['preset']} | {variant} | {x['optimizer_state_gb']:.2f} GB | {x['gradients_gb']:.2f} GB | "
                   f"{x['analytic_total_gb']:.2f} GB | {xla} |" + (f" {x.get(fit, '')} |" if fit else ""))
    png = path.replace(".json", ".png")
    if os.path.exists(os.path.join(ROOT, png)):
      lines += ["", f"![memory]({png})"]
    lines += ["", f"*{r['note']}*", "", provenance(path, r), ""]
  return lines


def compiled_for_gpu(path: str, r: dict) -> list[str]:
  """bench/memory.py --compile_for: XLA's CUDA compiler's figures of each variant, and its largest temporaries."""
  tokens = r["results"][0].get("tokens_per_step") if r["results"] else None
  lines = [f"**Memory at {tokens} tokens/step compiled for a GPU that is not here: {r['compiled_for']}** "
           "(XLA's CUDA compiler on a compile-only device; nothing allocated)", "",
           "| model | variant | optimizer state | analytic total | XLA arguments | XLA temporaries | XLA peak | "
           "largest temporaries at their peak |", "|---|---|---|---|---|---|---|---|"]
  for x in r["results"]:
    if "error" in x:
      lines.append(f"| {x['preset']} | {x['variant']} | failed: {x['error']} | | | | | |")
      continue
    largest = ", ".join(f"{g['kind']} {g['shape'].lstrip('(')} ×{g['count']} {g['gb']:.2f} GB"
                        for g in x.get("xla_temp_peak_groups", [])[:3])
    variant = x["variant"] + (", scanned layers" if x.get("scan_layers") else "")
    lines.append(f"| {x['preset']} | {variant} | {gb(x['optimizer_state_gb'])} | {gb(x['analytic_total_gb'])} | "
                 f"{gb(x['xla_argument_gb'])} | {gb(x['xla_temp_gb'])} | {gb(x['xla_peak_gb'])} | {largest} |")
  return lines + [""] + footer(path, r)


def step_time_section() -> list[str]:
  lines = []
  for path, r in load("step_time-*.json"):
    shapes = r["shapes"]
    lines += [f"**Optimizer update alone** (no model), {r['preset']} kernels, {shapes['layers']} of "
              f"{shapes['preset_layers']} layers ({r['params'] / 1e6:.0f}M params, {r.get('dtype', 'float32')}), "
              f"rank {r['settings']['rank']}, T = {r['settings']['update_proj_gap']}", "",
              "| optimizer | refresh step | other steps | amortized vs AdamW | other steps vs AdamW | state | "
              "state copies per step | XLA temporaries |", "|---|---|---|---|---|---|---|---|"]
    for name, x in r["results"].items():
      compiled = x.get("compiled", {})
      copies = f"{compiled['entry_copy_bytes'] / 2**20:,.0f} MiB" if "entry_copy_bytes" in compiled else ""
      temp = f"{compiled['temp_bytes'] / 2**20:,.0f} MiB" if "temp_bytes" in compiled else ""
      refresh = "–" if x["refresh_s"] is None else f"{x['refresh_s']:.3f} s"
      amortized = "–" if x["ratio_to_adamw"] is None else f"{x['ratio_to_adamw']:.2f}×"
      lines.append(f"| {name} | {refresh} | {x['non_refresh_s']:.4f} s | {amortized} | "
                   f"{x['non_refresh_ratio_to_adamw']:.2f}× | {x['state_bytes'] / 2**20:,.0f} MiB | {copies} | "
                   f"{temp} |")
    lines += [""] + ([f"Note: {r['note']}", ""] if r.get("note") else []) + [provenance(path, r), ""]
  return lines


def compile_section() -> list[str]:
  lines = []
  for path, r in load("compile_time-*.json"):
    cells = ", ".join(f"{name} {x['compile_s']:.0f} s ({x['ratio_to_adamw']:.1f}×)"
                      for name, x in r["results"].items())
    lines += [f"**Compile time of the train step**, {r['preset']} ({r['kernels']} kernels, r = {r['rank']}): "
              f"{cells}.", ""] + ([f"Note: {r['note']}", ""] if r.get("note") else []) + [provenance(path, r), ""]
  return lines


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table, then the lines that end every result: a blank one."""
  return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def footer(path: str, r: dict) -> list[str]:
  return ([f"Note: {r['note']}", ""] if r.get("note") else []) + [provenance(path, r), ""]


def ms(seconds: float | None) -> str:
  return "–" if seconds is None else f"{seconds * 1e3:.1f} ms"


def gb(value: float | None, spec: str = ".2f") -> str:
  return "" if value is None else f"{value:{spec}} GB"


def compile_7b_section() -> list[str]:
  lines = []
  for path, r in load("compile-7b-*.json"):
    rows = [[name, f"{x['trace_lower_s']:.1f} s", f"{x['compile_s']:.1f} s", f"{x['total_s']:.1f} s",
             f"{x['ratio_to_adamw']:.2f}×", gb(x["optimizer_state_gb"]), gb(x["xla_peak_gb"])]
            for name, x in r["results"].items()]
    micro = f" in {r['micro_batches']} micro-batches" if r.get("micro_batches", 1) > 1 else ""
    lines += [f"**Compile time of the {r['preset']} train step** ({r['layers']} layers, {r['tokens_per_step']} tokens"
              f"{micro}, abstract shapes: nothing allocated)", ""]
    lines += table(["variant", "trace + lower", "compile", "total", "vs AdamW", "optimizer state", "XLA peak"], rows)
    lines += footer(path, r)
  return lines


def config_memory_section() -> list[str]:
  lines = []
  for path, r in load("config_memory-*.json"):
    rows = [[str(x["sequences"]), str(x.get("tokens_per_step", "")), gb(x.get("analytic_total_gb")),
             gb(x.get("xla_argument_gb")), gb(x.get("xla_temp_gb")), gb(x.get("xla_peak_gb")) or x.get("error", "")]
            for x in r["results"]]
    target = f"compiled for {r['compiled_for']} (no GPU here)" if r.get("compiled_for") else f"on {r['backend']}"
    lines += [f"**`{r['config']}`'s own train step {target}, per batch** (sequences per micro-batch; nothing "
              "allocated)", ""]
    lines += table(["sequences", "tokens per step", "analytic total", "XLA arguments", "XLA temporaries",
                    "XLA peak"], rows)
    lines += footer(path, r)
  return lines


def xla_peak_section() -> list[str]:
  lines = []
  for path, r in load("xla-peak-*.json"):
    rows = [[x["variant"], str(x["layers"]), x["dtype"], gb(x["temp_gb"]), gb(x["argument_gb"]),
             gb(x["optimizer_state_gb"]), gb(x["live_at_peak_gb"]), gb(x.get("temp_gb_per_layer"))]
            for x in r["results"]]
    lines += [f"**What XLA holds at the peak of the {r['preset']} step** ({r['tokens_per_step']} tokens, CPU compile)",
              ""]
    lines += table(["variant", "layers", "dtype", "temporaries", "arguments", "optimizer state", "live at peak",
                    "temporaries per layer"], rows)
    lines += footer(path, r)
  return lines


def skip_nonfinite_section() -> list[str]:
  lines = []
  for path, r in load("skip_nonfinite-*.json"):
    rows = [[x["preset"], str(x["layers"]), x["layout"], x["variant"], gb(x["unguarded_temp_gb"], ".3f"),
             f"{x['select_extra_gb']:+.3f} GB", "–" if x["cond_extra_gb"] is None else f"{x['cond_extra_gb']:+.3f} GB",
             gb(x["select_peak_gb"])]
            for x in r["results"]]
    lines += [f"**What skipping non-finite steps costs** ({r['tokens_per_step']} tokens, bf16 weights, XLA's "
              f"temporaries of the {r['backend'].upper()} compile: unguarded, and the extra of each guard)", ""]
    lines += table(["model", "layers", "layout", "variant", "unguarded", "select (default)", "lax.cond",
                    "peak with the select"], rows)
    lines += footer(path, r)
  return lines


def skip_time_section() -> list[str]:
  lines = []
  for path, r in load("skip_time-*.json"):
    rows = [[x["preset"], x["variant"], str(x["tokens_per_step"]), seconds(x["unguarded_s"]["median"], ".3f"),
             f"{x['inside_vs_unguarded']:.3f}×", f"{x['after_vs_unguarded']:.3f}×"] for x in r["results"]]
    lines += ["**What skipping non-finite steps costs in time** (the train step, median of interleaved rounds)", ""]
    lines += table(["model", "variant", "tokens/step", "unguarded", "skipped inside the optimizer (default)",
                    "selected after the update"], rows)
    lines += footer(path, r)
  return lines


def adam8bit_chunks_section() -> list[str]:
  lines = []
  for path, r in load("adam8bit_chunks-*.json"):
    base = r["results"][0]["chunk_size"]
    rows = [[x["dtype"], "×".join(map(str, x["shape"])), "whole leaf" if not x["chunk_size"] else str(x["chunk_size"]),
             gb(x["temp_gb"], ".3f"), seconds(x["update_s"]["median"]), f"{x[f'vs_chunk_size_{base}']:.2f}×"]
            for x in r["results"]]
    lines += ["**8-bit Adam's update of one large leaf, whole and in chunks** (`scale_by_adam_8bit(chunk_size=...)`: "
              "XLA's temporaries with the gradient and state donated; the update's time, median of interleaved "
              "rounds)", ""]
    lines += table(["gradient", "leaf", "chunk (elements)", "temporaries", "update", "time vs the first row"], rows)
    lines += footer(path, r)
  return lines


def family_memory_section() -> list[str]:
  lines = []
  for path, r in load("family_memory-*.json"):
    rows = [[x["preset"], x["variant"], str(x["rank"] or ""), gb(x["optimizer_state_gb"]), gb(x["moments_low_rank_gb"]),
             gb(x["projector_bases_gb"]), gb(x["rule_states_gb"], ".3f"), gb(x["full_rank_states_gb"]),
             gb(x.get("paper_7b_state_gb"), "")] for x in r["results"]]
    lines += ["**Optimizer state of the low-rank family** (analytic: nothing allocated)", ""]
    lines += table(["model", "variant", "rank", "state", "low-rank moments", "bases", "update-rule states",
                    "full-rank states", "paper"], rows)
    lines += footer(path, r)
  return lines


def quantized_bases_section() -> list[str]:
  lines = []
  for path, r in load("quantized_bases-*.json"):
    rows = [[x["kernel"], "×".join(map(str, x["shape"])), str(x["rank"]),
             f"{x['basis_bytes_float32']} / {x['basis_bytes_bfloat16']} / {x['basis_bytes_int4']}",
             f"{x['rel_error_projection_bfloat16_mean']:.2%} / {x['rel_error_projection_int4_mean']:.2%}",
             f"{x['rel_error_adamw_bfloat16_mean']:.1%} / {x['rel_error_adamw_int4_mean']:.1%}"] for x in r["results"]]
    lines += [f"**Q-GaLore's INT4 bases** ({r['preset']} kernel shapes, group size {r['group_size']}, {r['seeds']} "
              f"seeds, gradient: {r['gradient']}): bytes per basis and relative error against fp32 bases", ""]
    lines += table(["kernel", "shape", "rank", "fp32 / bf16 / int4 bytes", "projection error bf16 / int4",
                    "first AdamW update error bf16 / int4"], rows)
    lines += footer(path, r)
  return lines


def train_section() -> list[str]:
  lines = []
  for path, r in load("train-*.json"):
    x, opt = r["summary"], r.get("config", {}).get("optimizer", {})
    mfu = "–" if x.get("mfu") is None else f"{x['mfu']:.1%}"
    peak = "–" if x.get("memory_peak_gb") is None else f"{x['memory_peak_gb']:.1f} GB"
    tokens = "–" if x.get("tokens_per_sec") is None else f"{x['tokens_per_sec']:,.0f}"
    lines += [f"**`train.py`, {r.get('preset')}** ({opt.get('name')}, rank {opt.get('rank')}, refresh "
              f"{opt.get('refresh')}), {r['tokens_per_step']} tokens/step, {x['steps']} steps on {r['device']}: "
              f"{tokens} tokens/s, MFU {mfu}, step {seconds(x.get('step_time_s'), '.3f')} (median after the first, "
              f"which took {seconds(x.get('first_step_s'), '.1f')} with the compile), device memory peak {peak}"
              + (f"; stopped early: {r['error']}" if r.get("error") else "") + ".", "",
              f"*`{r['train_command']}`*", "", provenance(path, r), ""]
  return lines


def data_pipeline_section() -> list[str]:
  lines = []
  for path, r in load("data_pipeline-*.json"):
    x = r["stats"]
    private = all("data_private_gb" in p for p in r["phases"].values())
    rows = [[name.replace("_", " "), seconds(p["seconds"], ".1f"), gb(p["peak_rss_gb"]), gb(p["data_rss_gb"])]
            + ([gb(p["data_private_gb"])] if private else []) for name, p in r["phases"].items()]
    sample = r.get("tokenizer_train_bytes")  # absent: a result from before the tokenizer learnt from a sample
    learns = ("the whole training split" if sample is None else
              f"at most {sample / 1e9:.2f} GB of the training split (`data.tokenizer_train_bytes`)")
    compression = (f" (the validation text at {x['val_bytes'] / x['val_tokens']:.3f} bytes per token)"
                   if x.get("val_bytes") and x.get("val_tokens") else "")
    lines += [f"**`train.py`'s data pipeline**, {r['corpus']} ({r['corpus_bytes'] / 1e9:.2f} GB on disk, "
              f"{x['train_documents'] + x['val_documents']:,} documents, {x['train_tokens'] + x['val_tokens']:,} "
              f"tokens, tokenizer vocab {r['vocab_size']}): the first start (a fresh workdir) trains the tokenizer "
              f"on {learns}, encodes the corpus{compression} and writes the token cache; a later start is the same "
              "command again, on the unchanged corpus", ""]
    lines += table(["start", "time", "peak host memory", "of which the data"]
                   + (["the data's private memory (no mapped files)"] if private else []), rows)
    steps = [step for step in r["phases"]["first_start"].get("steps", [])
             if not step["line"].startswith("data: encoding ")]  # without the lines printed every 30 s
    if steps:
      lines += ["The first start step by step: when the pipeline printed each line, and the peak private memory "
                "since the line before", ""]
      lines += table(["line", "at", "peak private memory"],
                     [[f"`{step['line']}`", seconds(step["seconds"], ".1f"), gb(step["peak_private_gb"])]
                      for step in steps])
    lines += footer(path, r)
  return lines


def sections() -> list[str]:
  return (speed_section() + train_section() + compile_section() + compile_7b_section() + refresh_section()
          + refresh_parts_section() + exact_refresh_section() + quality_section() + memory_section()
          + config_memory_section() + xla_peak_section() + skip_nonfinite_section() + skip_time_section()
          + adam8bit_chunks_section() + family_memory_section()
          + quantized_bases_section() + step_time_section() + data_pipeline_section())


def render(page: str, body: list[str]) -> str:
  """``page`` with the text between its markers replaced by ``body`` (markers appended when absent)."""
  section = BEGIN + "\n" + "\n".join(body).rstrip() + "\n" + END
  if BEGIN in page and END in page:
    return page[:page.index(BEGIN)] + section + page[page.index(END) + len(END):]
  return page.rstrip() + ("\n\n" if page.strip() else "") + section + "\n"


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--out", default="docs/performance.md", help="relative to the repository root")
  return ap


def main(argv: list[str] | None = None) -> str:
  out = os.path.join(ROOT, parser().parse_args(sys.argv[1:] if argv is None else argv).out)
  page = open(out).read() if os.path.exists(out) else NEW_PAGE
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write(render(page, sections()))
  print(f"wrote the tables of {out}")
  return out


if __name__ == "__main__":
  main()
