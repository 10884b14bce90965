"""Memory of a training step, AdamW vs GaLore, from the dry run (nothing allocated), in the paper's Fig. 1 setting.

  python bench/memory.py [--presets llama_7b llama_1b] [--tokens 256] [--variants a,b] [--real_step]
                         [--analytic_only] [--out bench/results/memory-cpu]

For each preset: `adamw` (bf16 states, the paper's "BF16" baseline), `galore_adamw` with fp32 and with
bf16 states, and `galore_adamw_8bit`, each also with layerwise updates, all with bf16 weights, remat and
one sequence of 256 tokens per step; for each also the largest token micro-batch whose analytic total
fits in 24 GB. --analytic_only skips the compile (a 7B compile takes minutes on a CPU). Writes <out>.json and a stacked bar chart <out>.png with the paper's 22.0 GB (8-bit GaLore,
layerwise) and ~58 GB (BF16 AdamW) for reference. With --real_step (on a GPU) each variant runs in its
own process and also reports device_peak_gb of one real step; <out>.json is then the flat list and
<out>-full.json the full record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from galore_jax.train import dry_run  # noqa: E402

RANKS = {"llama_7b": 1024, "llama_1b": 512, "llama_350m": 256, "llama_130m": 256, "llama_60m": 128}
VARIANTS = {
    "adamw (bf16 states)": dict(name="adamw", moment_dtype="bfloat16"),
    "galore_adamw (fp32 states)": dict(name="galore_adamw", moment_dtype="float32", basis_dtype="float32"),
    "galore_adamw (bf16 states)": dict(name="galore_adamw", moment_dtype="bfloat16", basis_dtype="bfloat16"),
    "galore_adamw_8bit": dict(name="galore_adamw_8bit", basis_dtype="bfloat16"),
    "galore_adamw (fp32 states) + layerwise": dict(name="galore_adamw", moment_dtype="float32", basis_dtype="float32",
                                                   layerwise=True),
    "galore_adamw_8bit + layerwise": dict(name="galore_adamw_8bit", basis_dtype="bfloat16", layerwise=True),
}
BUDGET_GB = 24.0  # the paper's consumer GPU
PAPER_GB = {"8-bit GaLore + layerwise (paper)": 22.0, "BF16 AdamW (paper)": 58.0}


def config_for(preset: str, tokens: int, variant: dict):
  from configs.base import base

  cfg = base()
  cfg.model.preset = preset
  cfg.model.param_dtype = cfg.model.dtype = "bfloat16"
  cfg.model.remat = True
  cfg.model.max_position_embeddings = max(tokens, 256)
  cfg.data.seq_len = min(tokens, 256)
  cfg.train.batch_size = max(1, tokens // cfg.data.seq_len)
  cfg.train.grad_accum = 1
  cfg.optimizer.rank = RANKS[preset]
  cfg.optimizer.update({k: v for k, v in variant.items() if k != "layerwise"})
  cfg.train.layerwise = bool(variant.get("layerwise", False))
  return cfg


def plot(results: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parts = [("weights_gb", "weights"), ("gradients_gb", "gradients"), ("moments_low_rank_gb", "low-rank moments"),
           ("projector_bases_gb", "projector bases"), ("full_rank_states_gb", "full-rank Adam states"),
           ("activations_estimate_gb", "activations (estimate)")]
  labels = [f"{r['preset']}\n{r['variant']}" for r in results]
  fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(results)), 6))
  bottom = [0.0] * len(results)
  for key, name in parts:
    values = [r[key] for r in results]
    ax.bar(range(len(results)), values, bottom=bottom, label=name)
    bottom = [b + v for b, v in zip(bottom, values)]
  for name, gb in PAPER_GB.items():
    ax.axhline(gb, linestyle="--", linewidth=1, color="black" if gb < 30 else "gray")
    ax.text(len(results) - 0.5, gb, f" {name}: {gb:g} GB", va="bottom", ha="right", fontsize=8)
  ax.set_xticks(range(len(results)), labels, fontsize=7)
  ax.set_ylabel("GB")
  ax.set_title("Training memory at 256 tokens/step (analytic parts of the dry run; bf16 weights, remat)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def one_variant(preset: str, tokens: int, variant: str, real_step: bool, analytic_only: bool = False) -> dict:
  cfg = config_for(preset, tokens, VARIANTS[variant])
  report = dry_run.analytic(cfg) if analytic_only else dry_run.dry_run(cfg, real_step=real_step)
  report["variant"] = variant
  report[f"sequences_in_{BUDGET_GB:g}gb"] = dry_run.sequences_that_fit(cfg, BUDGET_GB)
  report[f"tokens_in_{BUDGET_GB:g}gb"] = report[f"sequences_in_{BUDGET_GB:g}gb"] * cfg.data.seq_len
  return report


def in_subprocess(preset: str, tokens: int, variant: str) -> dict:
  """One variant with a real step in a fresh process, so that the allocator's peak is this variant's alone."""
  import subprocess

  out = subprocess.run([sys.executable, __file__, "--one", variant, "--presets", preset, "--tokens", str(tokens),
                        "--real_step"], capture_output=True, text=True)
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    return {"preset": preset, "variant": variant, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(lines[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--presets", nargs="+", default=["llama_7b", "llama_1b"])
  parser.add_argument("--tokens", type=int, default=256)
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
  parser.add_argument("--real_step", action="store_true", help="also run one real step per variant (GPU), each in "
                      "its own process, for device_peak_gb")
  parser.add_argument("--analytic_only", action="store_true", help="the analytic figures only: nothing compiled")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=f"bench/results/memory-{jax.default_backend()}")
  args = parser.parse_args()
  if args.one:
    print(json.dumps(one_variant(args.presets[0], args.tokens, args.one, args.real_step)))
    return

  results = []
  for preset in args.presets:
    for variant in args.variants.split(","):
      report = (in_subprocess(preset, args.tokens, variant) if args.real_step
                else one_variant(preset, args.tokens, variant, real_step=False, analytic_only=args.analytic_only))
      results.append(report)
      if "error" in report:
        print(f"{preset:<10} {variant:<28} failed: {report['error']}", flush=True)
        continue
      print(f"{preset:<10} {variant:<40} state {report['optimizer_state_gb']:6.2f} GB  analytic total "
            f"{report['analytic_total_gb']:6.2f} GB  XLA peak {report.get('xla_peak_gb', float('nan')):6.2f} GB  "
            f"device peak {report.get('device_peak_gb', float('nan')):6.2f} GB  "
            f"tokens in {BUDGET_GB:g} GB {report[f'tokens_in_{BUDGET_GB:g}gb']}", flush=True)
  import flax
  import optax

  record = {
      "date": datetime.date.today().isoformat(),
      "command": " ".join(["python"] + sys.argv),
      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "versions": {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
                   "python": platform.python_version()},
      "paper_gb": PAPER_GB,
      "note": dry_run.LIMITS + " The stacked bars are the analytic parts; xla_peak_gb is XLA's own figure. "
              f"tokens_in_{BUDGET_GB:g}gb: the largest micro-batch (whole sequences) whose analytic total fits "
              f"in {BUDGET_GB:g} GB (1e9 bytes), remat on.",
      "results": results,
  }
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ("-full.json" if args.real_step else ".json"), "w") as f:
    json.dump(record, f, indent=1)
  if args.real_step:  # <out>.json: the flat list (e.g. bench/results/memory-7b-gpu.json) that issue 7 asks for
    keys = ("backend", "device", "optimizer", "variant", "layerwise", "tokens_per_step", "xla_peak_gb",
            "device_peak_gb", "optimizer_state_gb", "compile_s", "error")
    flat = [{k: r.get(k) for k in keys if k in r} | {"tokens": r.get("tokens_per_step"), "preset": r["preset"],
                                                      "date": record["date"], "versions": record["versions"],
                                                      "command": record["command"]} for r in results]
    with open(args.out + ".json", "w") as f:
      json.dump(flat, f, indent=1)
  ok = [r for r in results if "error" not in r]
  if ok:
    plot(ok, args.out + ".png")
  print(json.dumps({"json": args.out + ".json", "png": args.out + ".png"}))


if __name__ == "__main__":
  main()
