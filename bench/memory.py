"""Memory of a training step, AdamW vs GaLore, from the dry run (nothing allocated), in the paper's Fig. 1 setting.

  python -m bench.memory [--presets llama_7b llama_1b] [--tokens 256] [--layers N] [--variants a,b] [--real_step]
                         [--scan_layers] [--analytic_only] [--out bench/results/memory-<backend>]

For each preset (its run config, bench/common.py: the paper config's rank, gap and clipping) and each variant:
`adamw` (bf16 states, the paper's "BF16" baseline), `galore_adamw` with fp32 and with bf16 states, and
`galore_adamw_8bit`, each also with layerwise updates, all with bf16 weights, remat and one sequence of 256
tokens per step; for each also the largest token micro-batch whose analytic total fits in 24 GB. --analytic_only
skips the compile (a 7B compile takes minutes on a CPU). Writes <out>.json and a stacked bar chart <out>.png with
the paper's 22.0 GB (8-bit GaLore, layerwise) and ~58 GB (BF16 AdamW) for reference. With --real_step (on a GPU)
each variant runs in its own process and also reports device_peak_gb of one real step (the allocator's peak),
beside the dry run's analytic total and XLA's peak; <out>.json is then the flat list and <out>-full.json the full
record. The files are rewritten after each variant: a time limit keeps the variants that finished. With
--xla_dump DIR (and --real_step) each variant's process also dumps XLA's compiled train step (final HLO, buffer
assignment, memory usage report) into DIR/<preset>_<variant>/: what the device held at its peak can then be read on any
machine afterwards (bench/gpu_7b.sh packs it into one results file).

--compile_for h100 compiles each variant, in its own process, for a GPU this machine does not have
(``bench/gpu_target.py``: XLA's CUDA compiler on a compile-only device, ``bench/gpu_targets/``): xla_peak_gb
is then the GPU's buffer assignment, not the CPU's, and --xla_dump dumps it. Writes
bench/results/memory-<target>-aot by default.

--scan_layers stacks the layers (``model.scan_layers``, one ``lax.scan``), as both 7B configs do:
the layerwise step then sweeps the stack in one scan instead of unrolling every layer, and a Llama-7B step
compiles in well under a minute instead of ~15 minutes (``bench/results/compile-7b-cpu.json``), which is what
lets the device script's real steps finish within their time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from bench import common, gpu_target, xla_peak
from galore_jax.train import dry_run

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
GPU_TARGET_NOTE = (
    "Compiled for the GPU without it (bench/gpu_target.py): XLA's CUDA passes, fusion and buffer assignment, so "
    "xla_peak_gb (arguments + temporaries) is what the device's allocator will be asked for by the step, before "
    "its own rounding and the libraries' workspaces; autotuning is skipped, which picks kernels, not buffers. "
    "xla_temp_at_peak_gb and its groups: the bytes of the temporaries in use at their peak (buffer assignment).")
FLAT_KEYS = ("backend", "device", "optimizer", "variant", "layerwise", "scan_layers", "tokens_per_step",
             "analytic_total_gb", "xla_peak_gb", "device_peak_gb", "device_in_use_before_step_gb",
             "optimizer_state_gb", "compile_s", "error")


def config_for(preset: str, tokens: int, variant: dict, layers: int | None = None, scan_layers: bool = False):
  """The preset's run config with bf16 weights, remat, ``tokens`` per step (sequences of at most 256), the
  variant's optimizer, stacked layers with ``scan_layers`` and, when given, only the first ``layers`` layers."""
  cfg = common.run_config(preset)
  cfg.model.num_hidden_layers = layers
  cfg.model.scan_layers = scan_layers
  cfg.model.param_dtype = cfg.model.dtype = "bfloat16"
  cfg.model.remat = True
  cfg.model.max_position_embeddings = max(tokens, 256)
  cfg.data.seq_len = min(tokens, 256)
  cfg.train.batch_size = max(1, tokens // cfg.data.seq_len)
  cfg.train.grad_accum = 1
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
  ax.set_title(f"Training memory at {results[0]['tokens_per_step']} tokens/step (analytic parts of the dry run; "
               "bf16 weights, remat)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def one_variant(args, preset: str, variant: str, real_step: bool) -> dict:
  cfg = config_for(preset, args.tokens, VARIANTS[variant], args.layers, args.scan_layers)
  device = gpu_target.device(args.compile_for) if args.compile_for else None
  report = dry_run.analytic(cfg) if args.analytic_only else dry_run.dry_run(cfg, real_step=real_step, device=device)
  report["variant"] = variant
  report["scan_layers"] = args.scan_layers
  report[f"sequences_in_{BUDGET_GB:g}gb"] = dry_run.sequences_that_fit(cfg, BUDGET_GB)
  report[f"tokens_in_{BUDGET_GB:g}gb"] = report[f"sequences_in_{BUDGET_GB:g}gb"] * cfg.data.seq_len
  return report


def dump_folder(args, preset: str, variant: str) -> str:
  """``<xla_dump>/<preset>_<variant>/`` (each run of other characters than letters, digits and ``_`` made one ``_``)."""
  return os.path.join(args.xla_dump, re.sub(r"[^A-Za-z0-9_]+", "_", f"{preset}-{variant}").strip("_"))


def variant_env(args, preset: str, variant: str) -> dict:
  """The environment of a variant's process: with --xla_dump, XLA dumping its train step into
  :func:`dump_folder`; with --compile_for, the CUDA plugin found and jax kept on the CPU."""
  env = gpu_target.environment() if args.compile_for else dict(os.environ)
  if args.xla_dump:
    folder = dump_folder(args, preset, variant)
    flags = f"--xla_dump_to={folder} --xla_dump_hlo_module_re=.*train.*"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  return env


def in_subprocess(args, preset: str, variant: str) -> dict:
  """One variant in a fresh process: the allocator's peak of a real step is this variant's alone, and a compile
  for another GPU gets its own environment."""
  layers = ["--layers", str(args.layers)] if args.layers else []
  scan = ["--scan_layers"] if args.scan_layers else []
  mode = ["--compile_for", args.compile_for] if args.compile_for else ["--real_step"]
  out = subprocess.run([sys.executable, "-m", __spec__.name, "--one", variant, "--presets", preset, "--tokens",
                        str(args.tokens), *layers, *scan, *mode], cwd=common.ROOT, capture_output=True,
                       text=True, env=variant_env(args, preset, variant))
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    return {"preset": preset, "variant": variant, "scan_layers": args.scan_layers,
            "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
  report = json.loads(lines[-1])
  try:  # the train step's temporaries at their peak, what the largest are; the variant's figures stand without
    dumps = xla_peak.dump_rows(dump_folder(args, preset, variant), top=8) if args.xla_dump else []
  except Exception as e:  # noqa: BLE001 (a dump another XLA version writes differently must not lose a device run)
    return {**report, "xla_temp_peak_error": f"{type(e).__name__}: {e}"[:300]}
  if dumps:
    step = max(dumps, key=lambda row: row["temp_at_peak_gb"])
    report.update(xla_temp_at_peak_gb=step["temp_at_peak_gb"], xla_temp_peak_groups=step["temp_peak_groups"])
  return report


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--presets", nargs="+", default=["llama_7b", "llama_1b"], choices=common.PRESETS)
  ap.add_argument("--tokens", type=int, default=256)
  ap.add_argument("--layers", type=int, default=None, help="keep the first N layers of each preset (quick runs)")
  ap.add_argument("--variants", default=common.SEPARATOR.join(VARIANTS),
                  help="comma-separated subset of: " + ", ".join(VARIANTS))
  ap.add_argument("--real_step", action="store_true", help="also run one real step per variant (GPU), each in "
                  "its own process, for device_peak_gb")
  ap.add_argument("--scan_layers", action="store_true", help="stacked layers run by lax.scan (model.scan_layers), "
                  "as the 7B configs: a 7B step compiles in under a minute")
  ap.add_argument("--analytic_only", action="store_true", help="the analytic figures only: nothing compiled")
  ap.add_argument("--compile_for", default=None, help="compile each variant for this GPU without one "
                  "(bench/gpu_targets/*.txtpb, e.g. h100): the GPU's XLA peak; default out memory-<target>-aot")
  ap.add_argument("--xla_dump", default=None, help="with --real_step or --compile_for: dump each variant's compiled "
                  "train step (HLO, buffer assignment) into XLA_DUMP/<preset>_<variant>/")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help="default bench/results/memory-<backend> (.json, .png)")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.variants = common.choose(args.one or args.variants, VARIANTS, "variant")
  if args.layers is not None and args.layers < 1:
    common.fail(f"--layers {args.layers} must be positive")
  if args.tokens < 1:
    common.fail(f"--tokens {args.tokens} must be positive")
  if args.xla_dump and not (args.real_step or args.compile_for):
    common.fail(f"--xla_dump {args.xla_dump!r} needs --real_step or --compile_for (the dump is made by each "
                "variant's own process)")
  if args.compile_for:
    if args.real_step or args.analytic_only:
      common.fail(f"--compile_for {args.compile_for!r} compiles for a GPU that is not here: it runs no real step "
                  "and is not --analytic_only")
    gpu_target.check(args.compile_for)
  return args


def describe(report: dict) -> str:
  if "error" in report:
    return f"{report['preset']:<10} {report['variant']:<40} failed: {report['error']}"
  nan = float("nan")
  return (f"{report['preset']:<10} {report['variant']:<40} state {report['optimizer_state_gb']:6.2f} GB  analytic "
          f"total {report['analytic_total_gb']:6.2f} GB  XLA peak {report.get('xla_peak_gb', nan):6.2f} GB  "
          f"device peak {report.get('device_peak_gb', nan):6.2f} GB  tokens in {BUDGET_GB:g} GB "
          f"{report[f'tokens_in_{BUDGET_GB:g}gb']}")


def write(args, provenance: dict, results: list[dict]) -> None:
  """<out>.json (with --real_step: <out>-full.json, and <out>.json the flat list) and the chart <out>.png."""
  limits = GPU_TARGET_NOTE if args.compile_for else dry_run.LIMITS
  record = {
      **provenance, "paper_gb": PAPER_GB,
      "note": limits + " The stacked bars are the analytic parts; xla_peak_gb is XLA's own figure. "
              f"tokens_in_{BUDGET_GB:g}gb: the largest micro-batch (whole sequences) whose analytic total fits "
              f"in {BUDGET_GB:g} GB (1e9 bytes), remat on.",
      "results": results,
  }
  common.write_json(args.out + ("-full.json" if args.real_step else ".json"), record)
  if args.real_step:  # <out>.json: the flat list (e.g. bench/results/memory-7b-gpu.json)
    provenance = {k: record[k] for k in ("date", "versions", "command")}
    flat = [{k: r[k] for k in FLAT_KEYS if k in r} | {"tokens": r.get("tokens_per_step"), "preset": r["preset"]}
            | provenance for r in results]
    common.write_json(args.out + ".json", flat)
  ok = [r for r in results if "error" not in r]
  if ok:
    plot(ok, args.out + ".png")


def main(argv: list[str] | None = None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.one:
    print(json.dumps(one_variant(args, args.presets[0], args.one, args.real_step)))
    return []
  # With --real_step the steps run in child processes: this one never starts a backend, which on a GPU would hold
  # most of the memory they need.
  provenance = common.provenance(__spec__.name, argv, probe=args.real_step)
  if args.compile_for:
    provenance["compiled_for"] = f"{args.compile_for} (bench/gpu_targets/{args.compile_for}.txtpb, no GPU here)"
  args.out = args.out or f"{common.RESULTS}/memory-" + (f"{args.compile_for}-aot" if args.compile_for
                                                         else provenance["backend"])
  results = []
  for preset in args.presets:
    for variant in args.variants:
      results.append(in_subprocess(args, preset, variant) if args.real_step or args.compile_for
                     else one_variant(args, preset, variant, real_step=False))
      print(describe(results[-1]), flush=True)
      write(args, provenance, results)
  print(json.dumps({"json": args.out + ".json", "png": args.out + ".png"}))
  return results


if __name__ == "__main__":
  main()
