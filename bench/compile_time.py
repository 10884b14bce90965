"""Compile time of the real train step on abstract shapes: AdamW vs GaLore with each refresh (nothing allocated).

  python -m bench.compile_time [--preset llama_130m] [--vocab 1024] [--seq_len 64] [--repeats 1] [--variants a,b]
                               [--out PATH]

The GaLore step carries the refresh inside `lax.cond` branches (one per group of equal shapes, with a loop
over the group's leaves); this measures what that costs the compiler, with `batch_refresh` (one batched call
per group) and `stagger` (leaves of a group due on different steps). The model is the preset with fp32
weights, one sequence of `--seq_len` tokens, no packing; the rank is the preset's paper rank (bench/common.py).
Each variant's step is built, lowered and compiled afresh `--repeats` times, in rounds whose order rotates, so that
a change of the machine's load and the one-time costs of the process's first compile spread over all variants;
`compile_s` is the fastest of a variant's samples (`compile_samples_s`). Writes
bench/results/compile_time-<backend>-<preset>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import optax
from flax import nnx

from bench import common
from galore_jax import galore_adamw
from galore_jax.train import config, dry_run, steps

VARIANTS = {
    "adamw": lambda rank: optax.adamw(1e-3),
    "galore svd": lambda rank: galore_adamw(1e-3, rank=rank),
    "galore svd + batch_refresh": lambda rank: galore_adamw(1e-3, rank=rank, batch_refresh=True),
    "galore randomized": lambda rank: galore_adamw(1e-3, rank=rank, refresh="randomized"),
    "galore randomized + batch_refresh": lambda rank: galore_adamw(1e-3, rank=rank, refresh="randomized",
                                                                   batch_refresh=True),
    "galore randomized + stagger": lambda rank: galore_adamw(1e-3, rank=rank, refresh="randomized", stagger=True),
}


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_130m", choices=common.PRESETS)
  ap.add_argument("--vocab", type=common.int_within(1), default=1024)
  ap.add_argument("--seq_len", type=common.int_within(1), default=64)
  ap.add_argument("--repeats", type=int, default=1, help="compiles per variant, in rotated rounds")
  ap.add_argument("--variants", default=common.SEPARATOR.join(VARIANTS),
                  help="comma-separated subset of: " + ", ".join(VARIANTS) + " (adamw is always timed)")
  ap.add_argument("--out", default=None, help="default bench/results/compile_time-<backend>-<preset>.json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.variants = ["adamw"] + [v for v in common.choose(args.variants, VARIANTS, "variant") if v != "adamw"]
  if args.repeats < 1:
    common.fail(f"--repeats {args.repeats} must be at least 1")
  return args


def run_config(args):
  """The preset with fp32 weights, a ``--vocab`` vocabulary and one sequence of ``--seq_len`` tokens."""
  cfg = common.run_config(args.preset)
  cfg.model.param_dtype = cfg.model.dtype = "float32"
  cfg.model.remat = cfg.model.scan_layers = False
  cfg.model.vocab_size = args.vocab
  cfg.model.max_position_embeddings = args.seq_len
  cfg.data.seq_len = args.seq_len
  cfg.train.batch_size, cfg.train.grad_accum = 1, 1
  return cfg


def compile_seconds(graphdef, params, tx, cfg) -> float:
  """Seconds to lower and compile a fresh train step of ``tx`` on abstract shapes."""
  step = steps.make_steps(graphdef, tx, grad_accum=1, packed=False).train
  start = time.perf_counter()
  step.lower(params, jax.eval_shape(tx.init, params), dry_run.abstract_batch(cfg)).compile()
  return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  cfg = run_config(args)
  model = config.abstract_model(cfg)
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  rank = cfg.optimizer.rank
  samples = {name: [] for name in args.variants}
  for i in range(args.repeats):
    for name in args.variants[i % len(args.variants):] + args.variants[:i % len(args.variants)]:
      samples[name].append(compile_seconds(graphdef, params, VARIANTS[name](rank), cfg))
      print(f"{name:<36} {samples[name][-1]:6.1f} s", flush=True)
  results = {name: {"compile_s": min(times), "compile_samples_s": times} for name, times in samples.items()}
  for r in results.values():
    r["ratio_to_adamw"] = r["compile_s"] / results["adamw"]["compile_s"]
  record = {**common.provenance(__spec__.name, argv), "preset": args.preset, "rank": rank,
            "kernels": 7 * config.model_config(cfg).num_hidden_layers, "results": results}
  out = args.out or os.path.join(common.RESULTS, f"compile_time-{jax.default_backend()}-{args.preset}.json")
  common.write_json(out, record)
  print(json.dumps({k: round(v["ratio_to_adamw"], 2) for k, v in results.items()}))
  return record


if __name__ == "__main__":
  main()
