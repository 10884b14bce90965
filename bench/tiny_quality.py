"""Quality on configs/tiny.py: final eval loss of GaLore variants and the low-rank family against GaLore (exact SVD).

  python -m bench.tiny_quality [--seeds 0] [--variants svd randomized 8bit] [--workdir /tmp/tiny_quality]
                               [--set KEY=VALUE ...] [--collect_only] [--out PATH]

Each variant is one `python train.py --config configs/tiny.py` run (400 steps, llama_20m with a 4096-token
BPE on the embedded corpus, rank 64, T = 100) with the overrides below (and `--set` ones, passed to every run
as `--config.KEY=VALUE`); the eval loss at the last step is read from its metrics.jsonl. The spread between
seeds of the baseline (e.g. `--seeds 0 1`) says how much of a difference is noise. A run whose workdir already
holds the eval loss of its last step is not repeated (an interrupted one is resumed by train.py). The results
file is rewritten after each run. Writes bench/results/tiny_quality-cpu.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import common
from configs import tiny
from galore_jax.train import metrics

VARIANTS = {
    "svd": [],  # the baseline: exact SVD refresh, fp32 Adam states
    "randomized": ["--config.optimizer.refresh=randomized"],
    "randomized_warm": ["--config.optimizer.refresh=randomized_warm"],
    "8bit": ["--config.optimizer.name=galore_adamw_8bit"],
    "layerwise": ["--config.train.layerwise=True"],
}
# The low-rank family beside AdamW, each at its paper's learning rate (GaLore, Fira, APOLLO, APOLLO-Mini, GoLore,
# Q-GaLore: 0.01 as the config; AdamW: the GaLore paper's 1e-3 for its small models) and at one other.
METHODS = {"adamw": ["--config.optimizer.name=adamw", "--config.train.lr=0.001"],
           "fira": ["--config.optimizer.name=fira_adamw"],
           "apollo": ["--config.optimizer.name=apollo_adamw"],
           "apollo_mini": ["--config.optimizer.name=apollo_mini"],
           "golore": ["--config.optimizer.name=golore_adamw"],
           "q_galore": ["--config.optimizer.name=q_galore_adamw"]}
OTHER_LR = {"adamw": 0.003, "svd": 0.003, "fira": 0.003, "apollo": 0.003, "apollo_mini": 0.003, "golore": 0.003,
            "q_galore": 0.003}
VARIANTS |= METHODS
VARIANTS |= {f"{name}_lr{lr:g}": VARIANTS[name] + [f"--config.train.lr={lr:g}"] for name, lr in OTHER_LR.items()}
CONFIG = "configs/tiny.py"


STEPS = tiny.get_config().train.steps


def final_eval_loss(workdir: str, steps: int = STEPS) -> float | None:
  """The eval loss at step ``steps`` (the end of the run), or None: an interrupted run's earlier evals do not count."""
  rows = [row for row in metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "eval_loss" in row and row.get("step") == steps]
  return rows[-1]["eval_loss"] if rows else None


def run_steps(overrides: list[str]) -> int:
  """``train.steps`` of every run: the config's, or the last ``--set train.steps=N``."""
  given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "train.steps"]
  try:
    return int(given[-1]) if given else STEPS
  except ValueError:
    common.fail(f"--set train.steps={given[-1]!r} is not an integer")


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--variants", nargs="+", default=["svd", "randomized", "8bit"], choices=list(VARIANTS))
  ap.add_argument("--workdir", default="/tmp/tiny_quality")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for every run, e.g. train.steps=100")
  ap.add_argument("--collect_only", action="store_true", help="read finished runs, start none")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "tiny_quality-cpu.json"))
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  bad = [o for o in args.overrides if "=" not in o]
  if bad:
    common.fail(f"--set {bad[0]!r} is not KEY=VALUE")
  args.steps = run_steps(args.overrides)
  return args


def record(args, provenance: dict, runs: dict) -> dict:
  for r in runs.values():
    base = runs.get(f"svd_s{r['seed']}", {}).get("eval_loss")
    if base and r["eval_loss"]:
      r["rel_diff_to_svd_same_seed"] = r["eval_loss"] / base - 1
  baselines = [r["eval_loss"] for r in runs.values() if r["variant"] == "svd" and r["eval_loss"]]
  overrides = "".join(f", {o}" for o in args.overrides)
  return {**provenance,
          "config": f"{CONFIG} (400 steps, llama_20m vocab 4096, rank 64, update_proj_gap 100{overrides})",
          "svd_seed_spread": (max(baselines) / min(baselines) - 1) if len(baselines) > 1 else None, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  provenance = common.provenance(__spec__.name, argv)
  runs = {}
  for seed in args.seeds:
    for variant in args.variants:
      workdir = os.path.join(args.workdir, f"{variant}_s{seed}")
      cmd = [sys.executable, "train.py", "--config", CONFIG, f"--config.workdir={workdir}", f"--config.seed={seed}",
             *VARIANTS[variant], *(f"--config.{o}" for o in args.overrides)]
      if not args.collect_only and final_eval_loss(workdir, args.steps) is None:
        done = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True)
        if done.returncode:
          sys.exit(f"error: {' '.join(cmd[1:])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
      loss = final_eval_loss(workdir, args.steps)
      if loss is not None:  # --collect_only: runs that were not made are left out
        runs[f"{variant}_s{seed}"] = {"variant": variant, "seed": seed, "eval_loss": loss,
                                      "command": " ".join(["python"] + cmd[1:])}
        common.write_json(args.out, record(args, provenance, runs))
  result = record(args, provenance, runs)
  print(json.dumps({k: round(v["rel_diff_to_svd_same_seed"], 4) for k, v in runs.items()
                    if "rel_diff_to_svd_same_seed" in v} | {"svd_seed_spread": result["svd_seed_spread"]}))
  return result


if __name__ == "__main__":
  main()
