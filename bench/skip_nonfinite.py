"""What skipping non-finite steps costs in memory: XLA's temporaries of the train step unguarded, guarded by a select
(the default, ``train.nonfinite="skip"``: inside the optimizer where it honours ``finite``, see
``galore_jax.optim.guard``) and, for the whole-tree step, by a ``lax.cond`` around the update.

  python -m bench.skip_nonfinite [--cases llama_7b:8:unrolled llama_7b:32:scanned ...] [--variants a,b] [--out PATH]

Each case is ``preset:layers:layout`` (layers 0 = all of the preset's; layout ``unrolled`` or ``scanned``, the
model's ``scan_layers``); each variant is one of ``bench.memory``'s (its optimizer, bf16 weights, remat, 256 tokens
per step). Every (case, variant) is lowered and compiled on abstract shapes (nothing allocated): ``unguarded``
(``make_steps(skip_nonfinite=False)``), ``select`` and ``cond`` (``skip_by``); a layerwise variant has no ``cond``
(its step selects as each group is updated). The figures are XLA's memory analysis of this backend's compile,
so on a CPU they are XLA:CPU's buffer assignment, not a GPU's. Writes ``bench/results/skip_nonfinite-<backend>.json``,
rewritten after each case.
"""

from __future__ import annotations

import sys

from bench import common, memory

GUARDS = ("unguarded", "select", "cond")
LAYOUTS = ("unrolled", "scanned")
DEFAULT_CASES = ["llama_60m:0:unrolled", "llama_1b:0:unrolled", "llama_7b:2:unrolled", "llama_7b:8:unrolled",
                 "llama_7b:32:scanned"]
DEFAULT_VARIANTS = ["adamw (bf16 states)", "galore_adamw (bf16 states)", "galore_adamw (fp32 states)"]
GB = 1e9


def parse_case(text: str) -> tuple[str, int, str]:
  """``"llama_7b:8:unrolled"`` -> ``("llama_7b", 8, "unrolled")``; a one-line error for anything else."""
  from galore_jax.models import llama

  parts = text.split(":")
  if len(parts) != 3 or parts[0] not in common.PRESETS or not parts[1].isdigit() or parts[2] not in LAYOUTS:
    common.fail(f"--cases {text!r} is not preset:layers:layout (a preset of bench/common.py, layers 0 for all, "
                f"layout {' or '.join(LAYOUTS)})")
  most = llama.PRESETS[parts[0]].num_hidden_layers
  if int(parts[1]) > most:
    common.fail(f"--cases {text!r}: {parts[0]} has {most} layers")
  return parts[0], int(parts[1]), parts[2]


def compile_guards(preset: str, layers: int, layout: str, variant: str) -> dict:
  """XLA's memory figures of the step compiled with each guard (GB)."""
  import jax
  from flax import nnx

  from galore_jax.train import config, dry_run, steps

  cfg = memory.config_for(preset, 256, memory.VARIANTS[variant], layers or None, layout == "scanned")
  abstract = config.abstract_model(cfg)
  params = steps.params_of(abstract)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  row = {"preset": preset, "layers": config.model_config(cfg).num_hidden_layers, "layout": layout,
         "variant": variant, "optimizer_state_gb": common.tree_bytes(opt_state) / GB,
         "params_gb": common.tree_bytes(params) / GB}
  guards = GUARDS[:2] if cfg.train.layerwise else GUARDS
  for guard in guards:
    step = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=1, packed=cfg.data.packing,
                            report_overlap=config.reports_overlap(cfg), skip_nonfinite=guard != "unguarded",
                            skip_by="cond" if guard == "cond" else "select",
                            layerwise_updates=cfg.train.layerwise).train
    m = step.lower(params, opt_state, dry_run.abstract_batch(cfg)).compile().memory_analysis()
    row[f"{guard}_temp_gb"] = m.temp_size_in_bytes / GB
    row[f"{guard}_peak_gb"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes) / GB
  for guard in ("select", "cond"):
    row[f"{guard}_extra_gb"] = row[f"{guard}_temp_gb"] - row["unguarded_temp_gb"] if guard in guards else None
  return row


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="preset:layers:layout ...")
  ap.add_argument("--variants", default=common.SEPARATOR.join(DEFAULT_VARIANTS),
                  help="comma-separated subset of: " + ", ".join(memory.VARIANTS))
  ap.add_argument("--out", default=None, help="default bench/results/skip_nonfinite-<backend>.json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.cases = [parse_case(c) for c in args.cases]
  args.variants = common.choose(args.variants, list(memory.VARIANTS), "variant")
  return args


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  record = {**common.provenance(__spec__.name, argv), "tokens_per_step": 256, "results": []}
  out = args.out or f"{common.RESULTS}/skip_nonfinite-{record['backend']}.json"
  for preset, layers, layout in args.cases:
    for variant in args.variants:
      row = compile_guards(preset, layers, layout, variant)
      record["results"].append(row)
      print(f"{preset} {row['layers']:>2} layers {layout:<8} {variant:<28} temporaries: unguarded "
            f"{row['unguarded_temp_gb']:.3f} GB, select {row['select_extra_gb']:+.3f}, cond "
            + ("-" if row["cond_extra_gb"] is None else f"{row['cond_extra_gb']:+.3f}"), flush=True)
      common.write_json(out, record)
  return record


if __name__ == "__main__":
  main()
