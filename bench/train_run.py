"""A few steps of `python train.py --config <config>` as a user runs it, its metrics copied into a results file.

  python -m bench.train_run [--config configs/llama7b.py] [--steps 6] [--batch_size 8] [--grad_accum 1]
                            [--max_bytes 2000000] [--set KEY=VALUE ...] [--workdir /tmp/train_run] [--out PATH]

train.py runs in a fresh workdir on the embedded corpus (the Python standard library's source, `--max_bytes` of
it: nothing is downloaded; the BPE tokenizer is trained on it first) with `--batch_size` sequences per step in
`--grad_accum` micro-batches (the default, 8 sequences of 256 tokens in one micro-batch, is one micro-batch of
the paper's 7B run), a metrics line every step, no eval and no checkpoint: once `--steps` steps are logged the
run is stopped (SIGKILL; a 7B checkpoint would take minutes to write). From its metrics.jsonl: per step the
loss, tokens/s, step time, MFU and device memory peak (GPU); the summary takes the median over the steps after
the first (which compiles the step and refreshes the bases) and the largest memory peak. The results file
(bench/results/train-<backend>-<config file name>.json, e.g. train-gpu-llama7b.json) is rewritten as steps
arrive, so a time limit keeps what ran.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from bench import common
from galore_jax.train import metrics

POLL_S = 1.0
MARK = ".bench_train_run"  # in a workdir this script made: only such a workdir is emptied
NO_END = 10**9  # train.steps, eval.every and checkpoint.every of the stopped run: it never evaluates or saves


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--config", default="configs/llama7b.py")
  ap.add_argument("--steps", type=int, default=6, help="logged steps before the run is stopped")
  ap.add_argument("--batch_size", type=int, default=8, help="sequences per optimizer step (train.batch_size)")
  ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (train.grad_accum)")
  ap.add_argument("--max_bytes", type=int, default=2_000_000, help="bytes of the embedded corpus (data.max_bytes)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="another config override, e.g. train.layerwise=True")
  ap.add_argument("--workdir", default="/tmp/train_run", help="a new directory, or one this script made (emptied "
                  "first); any other existing directory is refused")
  ap.add_argument("--out", default=None, help="default bench/results/train-<backend>-<config file name>.json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  if not os.path.isfile(os.path.join(common.ROOT, args.config)):
    common.fail(f"config file {args.config!r} does not exist")
  bad = [o for o in args.overrides if "=" not in o]
  if bad:
    common.fail(f"--set {bad[0]!r} is not KEY=VALUE")
  for name in ("steps", "batch_size", "grad_accum", "max_bytes"):
    if getattr(args, name) < 1:
      common.fail(f"--{name} {getattr(args, name)} must be positive")
  if os.path.exists(args.workdir) and not os.path.exists(os.path.join(args.workdir, MARK)):
    common.fail(f"--workdir {args.workdir!r} exists and was not made by bench.train_run; name a new directory")
  return args


def fresh_workdir(workdir: str) -> None:
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  open(os.path.join(workdir, MARK), "w").close()


def train_command(args) -> list[str]:
  overrides = {"workdir": args.workdir, "data.max_bytes": args.max_bytes,
               "train.batch_size": args.batch_size, "train.grad_accum": args.grad_accum, "train.steps": NO_END,
               "train.log_every": 1, "eval.every": NO_END, "checkpoint.every": NO_END}
  return [sys.executable, "train.py", "--config", args.config, *(f"--config.{k}={v}" for k, v in overrides.items()),
          *(f"--config.{o}" for o in args.overrides)]


def summary(rows: list[dict]) -> dict:
  """The steps after the first: median tokens/s, step time and MFU; the largest memory peak over all steps."""
  later = rows[1:]
  median = lambda key: statistics.median([r[key] for r in later]) if later and all(key in r for r in later) else None
  peaks = [r["memory_peak_gb"] for r in rows if "memory_peak_gb" in r]
  return {"steps": len(rows), "first_step_s": rows[0]["step_time"] if rows else None,
          "tokens_per_sec": median("tokens_per_sec"), "step_time_s": median("step_time"), "mfu": median("mfu"),
          "memory_peak_gb": max(peaks, default=None), "final_loss": rows[-1]["loss"] if rows else None}


def read_run(workdir: str) -> tuple[list[dict], dict]:
  """The train-step lines of the run's metrics.jsonl and its config.json (empty until written)."""
  rows = [r for r in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
  path = os.path.join(workdir, "config.json")
  return rows, (json.load(open(path)) if os.path.exists(path) else {})


def run(args, write) -> str | None:
  """Start train.py, ``write`` as steps arrive, stop it after ``args.steps``; an error line if it ended first."""
  child = subprocess.Popen(train_command(args), cwd=common.ROOT)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: stopped by SIGTERM"))  # the finally below stops train.py
  seen = 0
  try:
    while True:
      rows, _ = read_run(args.workdir)
      if len(rows) > seen:
        seen = len(rows)
        write()
      if seen >= args.steps:
        return None
      if child.poll() is not None:
        return f"train.py exited with code {child.returncode} after {seen} logged steps"
      time.sleep(POLL_S)
  finally:
    child.kill()
    child.wait()
    write()


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  fresh_workdir(args.workdir)
  provenance = common.provenance(__spec__.name, argv, probe=True)  # train.py gets the whole device
  stem = os.path.splitext(os.path.basename(args.config))[0]
  out = args.out or os.path.join(common.RESULTS, f"train-{provenance['backend']}-{stem}.json")
  error = None

  def write() -> dict:
    rows, cfg = read_run(args.workdir)
    rows = rows[:args.steps]
    return common.write_json(out, {
        **provenance, "train_command": " ".join(["python"] + train_command(args)[1:]),
        "preset": cfg.get("model", {}).get("preset"), "config": cfg,
        "tokens_per_step": args.batch_size * cfg.get("data", {}).get("seq_len", 0),
        "summary": summary(rows), "metrics": rows, "error": error})

  error = run(args, write)
  record = json.load(open(write()))
  print(json.dumps({"out": out, "error": error, **record["summary"]}))
  if error:
    sys.exit(f"error: {error}")
  return record


if __name__ == "__main__":
  main()
