"""Compile time and XLA memory of the Llama-7B train step on abstract shapes (nothing allocated), per optimizer.

  python -m bench.compile_7b [--layers N] [--variants NAME ...] [--repeats R] [--configured_batch] [--out PATH]

The step is the app's (``galore_jax.train.steps.make_steps``) with ``configs/llama7b.py``'s settings (bf16
weights and states, remat, rank 1024, T 500, clipping 1.0) at 256 tokens per step (one sequence, no
accumulation), lowered on ``ShapeDtypeStruct`` s and compiled ahead of time, as ``train.py --dry_run_compile``
does. Each variant runs in its own process (no warm tracing caches), AdamW first; the machine is shared, so
the ratios to AdamW measured in the same run are the figures to compare, not the seconds.

Per variant: ``trace_lower_s`` (tracing to StableHLO), ``compile_s`` (XLA), their sum ``total_s`` and its
``ratio_to_adamw`` (with ``--repeats R``: the variants run round-robin R times, each reports its median round and
``total_s_rounds``), and XLA's memory analysis (arguments, outputs, aliased, temporaries; peak = args + out -
alias + temp). ``--layers N`` keeps the first N of the 32 layers (a quick check; the file gets ``-Nlayers``).
``--configured_batch`` keeps the config's own batch instead, as ``train.py`` runs it: 512 sequences in 64
micro-batches of 8 (131,072 tokens per step, the micro-batches summed by a ``lax.scan``); the file gets
``-configured``. The variants name their layer layout (``model.scan_layers``) whatever the config's default.
Writes ``bench/results/compile-7b-<backend>[-Nlayers][-configured].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import common

# name -> config changes on top of configs/llama7b.py at 256 tokens per step (or its own batch)
UNROLLED = {"scan_layers": False}
VARIANTS = {
    "adamw": dict(optimizer={"name": "adamw"}, model=UNROLLED),
    "galore_adamw": dict(optimizer={"name": "galore_adamw"}, model=UNROLLED),
    "galore_adamw_8bit + layerwise": dict(optimizer={"name": "galore_adamw_8bit"}, train={"layerwise": True},
                                          model=UNROLLED),
    "adamw (scanned)": dict(optimizer={"name": "adamw"}, model={"scan_layers": True}),
    "galore_adamw (scanned)": dict(optimizer={"name": "galore_adamw"}, model={"scan_layers": True}),
    "galore_adamw_8bit + layerwise (scanned)": dict(optimizer={"name": "galore_adamw_8bit"}, train={"layerwise": True},
                                                    model={"scan_layers": True}),
}
GB = 1e9


def config_for(variant: str, layers: int | None, configured_batch: bool = False):
  from configs import llama7b

  cfg = llama7b.get_config()
  if not configured_batch:
    cfg.train.batch_size, cfg.train.grad_accum = 1, 1  # 256 tokens per step
  if layers:
    cfg.model.num_hidden_layers = layers
  for section, values in VARIANTS[variant].items():
    cfg[section].update(values)
  return cfg


def measure(variant: str, layers: int | None, configured_batch: bool = False) -> dict:
  """Trace, lower and compile one variant's train step; its times and XLA's memory figures."""
  import jax
  from flax import nnx

  from galore_jax.train import config, dry_run, steps

  cfg = config_for(variant, layers, configured_batch)
  config.validate(cfg)
  start = time.perf_counter()
  abstract = config.abstract_model(cfg)
  params = steps.params_of(abstract)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  step = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=cfg.train.grad_accum, packed=cfg.data.packing,
                          report_overlap=cfg.optimizer.name.startswith("galore"),
                          layerwise_updates=cfg.train.layerwise).train
  lowered = step.lower(params, opt_state, dry_run.abstract_batch(cfg))
  traced = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  m = compiled.memory_analysis()
  arg, out, alias, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes
  return {"trace_lower_s": traced - start, "compile_s": done - traced, "total_s": done - start,
          "optimizer_state_gb": common.tree_bytes(opt_state) / GB, "xla_argument_gb": arg / GB,
          "xla_output_gb": out / GB, "xla_alias_gb": alias / GB, "xla_temp_gb": temp / GB,
          "xla_peak_gb": (arg + out - alias + temp) / GB, "hlo_chars": len(compiled.as_text()),
          "loadavg_1min_after": os.getloadavg()[0]}


def run_variant(variant: str, layers: int | None, configured_batch: bool = False) -> dict:
  """``measure`` in a fresh process: no tracing or compilation cache shared between variants."""
  cmd = [sys.executable, "-m", "bench.compile_7b", "--one", variant] + (["--layers", str(layers)] if layers else [])
  cmd += ["--configured_batch"] if configured_batch else []
  result = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
  if result.returncode:
    raise RuntimeError(f"{variant}: {result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def commit() -> str:
  """The checkout's short commit: compile times change with the code, so results name it."""
  return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=common.ROOT).stdout.strip()


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--layers", type=common.int_within(1, 32), default=None,
                  help="keep the first N layers (default: all 32)")
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  ap.add_argument("--repeats", type=common.int_within(1), default=1,
                  help="rounds over the variants; each reports its median round")
  ap.add_argument("--configured_batch", action="store_true",
                  help="the config's own batch (64 micro-batches of 8 x 256 tokens), not 256 tokens per step")
  ap.add_argument("--out", default=None)
  ap.add_argument("--one", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
  return ap


def main(argv: list[str] | None = None) -> dict | None:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.layers, args.configured_batch)))
    return None
  variants = ["adamw"] + [v for v in args.variants if v != "adamw"]
  rounds = {name: [] for name in variants}
  for _ in range(args.repeats):  # round-robin: load from other processes hits every variant alike
    for name in variants:
      rounds[name].append(r := run_variant(name, args.layers, args.configured_batch))
      print(f"{name:<42} trace+lower {r['trace_lower_s']:7.1f} s  compile {r['compile_s']:7.1f} s  "
            f"temp {r['xla_temp_gb']:6.2f} GB  peak {r['xla_peak_gb']:6.2f} GB", flush=True)
  results = {name: {**sorted(rs, key=lambda r: r["total_s"])[len(rs) // 2],
                    "total_s_rounds": [r["total_s"] for r in rs]}
             for name, rs in rounds.items()}
  for r in results.values():
    r["ratio_to_adamw"] = r["total_s"] / results["adamw"]["total_s"]
  cfg = config_for("adamw", args.layers, args.configured_batch)
  batch = (f"train.batch_size={cfg.train.batch_size}, train.grad_accum={cfg.train.grad_accum}" if args.configured_batch
           else "train.batch_size=1, train.grad_accum=1")
  record = {**common.provenance(__spec__.name, argv), "commit": commit(), "preset": "llama_7b",
            "layers": args.layers or 32, "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
            "micro_batches": cfg.train.grad_accum, "config": f"configs/llama7b.py with {batch}", "results": results}
  suffix = (f"-{args.layers}layers" if args.layers else "") + ("-configured" if args.configured_batch else "")
  common.write_json(args.out or os.path.join(common.RESULTS, f"compile-7b-{record['backend']}{suffix}.json"), record)
  print(json.dumps({k: round(v["ratio_to_adamw"], 2) for k, v in results.items()}))
  return record


if __name__ == "__main__":
  main()
