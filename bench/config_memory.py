"""The memory of a config file's own train step, compiled for a GPU (nothing allocated), at its batch and others.

  python -m bench.config_memory [--config configs/llama7b_24gb.py] [--compile_for TARGET] [--sequences N ...]
                                [--out PATH]

Each batch (``train.batch_size`` sequences of ``data.seq_len`` tokens per micro-batch; default: the config's
own) is compiled in its own process, as ``train.py --dry_run_compile`` compiles the step, for the GPU that
``--compile_for`` names (``bench/gpu_target.py``; without it, for this machine's backend): XLA's arguments,
temporaries and peak beside the dry run's analytic total, which is what the config's batch was chosen by.
Writes ``bench/results/config_memory-<target or backend>-<config>.json``, rewritten after each batch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

from bench import common, gpu_target

KEYS = ("tokens_per_step", "analytic_total_gb", "xla_argument_gb", "xla_temp_gb", "xla_peak_gb", "compile_s",
        "backend", "device")


def load_config(path: str):
  module = os.path.splitext(os.path.relpath(os.path.abspath(path), common.ROOT))[0].replace(os.sep, ".")
  return importlib.import_module(module).get_config()


def measure(path: str, target: str | None, sequences: int | None) -> dict:
  """One batch's compiled step: the dry run's figures (in a process started with the target's environment)."""
  from galore_jax.train import config, dry_run

  cfg = load_config(path)
  if sequences:
    cfg.train.batch_size = sequences
  config.validate(cfg)
  report = dry_run.dry_run(cfg, real_step=False, device=gpu_target.device(target) if target else None)
  return {"sequences": cfg.train.batch_size, **{k: report[k] for k in KEYS if k in report}}


def in_subprocess(args, sequences: int | None) -> dict:
  target = ["--compile_for", args.compile_for] if args.compile_for else []
  out = subprocess.run([sys.executable, "-m", __spec__.name, "--config", args.config, *target,
                        "--one", str(sequences or 0)],
                       cwd=common.ROOT, capture_output=True, text=True,
                       env=gpu_target.environment() if args.compile_for else None)
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    return {"sequences": sequences, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(lines[-1])


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--config", default="configs/llama7b_24gb.py", help="a config file of this checkout")
  ap.add_argument("--compile_for", default=None, help="a GPU target (bench/gpu_targets/*.txtpb, e.g. h100); "
                  "default: this machine's backend")
  ap.add_argument("--sequences", type=common.int_within(1), nargs="+", default=None,
                  help="batch sizes to compile (default: the config's own)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  inside = not os.path.relpath(os.path.abspath(args.config), common.ROOT).startswith("..")
  if not (os.path.isfile(args.config) and args.config.endswith(".py") and inside):
    common.fail(f"--config {args.config!r} is not a config file of this checkout (e.g. configs/llama7b_24gb.py)")
  if args.compile_for:
    gpu_target.check(args.compile_for)
  return args


def main(argv: list[str] | None = None) -> dict | None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.one is not None:
    print(json.dumps(measure(args.config, args.compile_for, args.one or None)))
    return None
  provenance = common.provenance(__spec__.name, argv)
  name = os.path.splitext(os.path.basename(args.config))[0]
  target = args.compile_for or provenance["backend"]
  out = args.out or os.path.join(common.RESULTS, f"config_memory-{target}-{name}.json")
  record = {**provenance, "config": args.config, "compiled_for": args.compile_for, "results": []}
  for sequences in args.sequences or [None]:
    record["results"].append(r := in_subprocess(args, sequences))
    print(json.dumps(r), flush=True)
    common.write_json(out, record)
  return record


if __name__ == "__main__":
  main()
