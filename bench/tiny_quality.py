"""Quality on configs/tiny.py: final eval loss of GaLore variants against exact-SVD fp32-state GaLore.

  python bench/tiny_quality.py [--seeds 0 1] [--variants svd randomized 8bit] [--workdir /tmp/tiny_quality]
                               [--collect_only]

Each variant is one `python train.py --config configs/tiny.py` run (400 steps, llama_20m with a 4096-token
BPE on the standard-library corpus, rank 64, T = 100) with the overrides below; the eval loss at the last
step is read from its metrics.jsonl. The spread between seeds of the baseline says how much of a
difference is noise. Writes bench/results/tiny_quality-cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "svd": [],  # the baseline: exact SVD refresh, fp32 Adam states
    "randomized": ["--config.optimizer.refresh=randomized"],
    "randomized_warm": ["--config.optimizer.refresh=randomized_warm"],
    "8bit": ["--config.optimizer.name=galore_adamw_8bit"],
    "layerwise": ["--config.train.layerwise=True"],
}


def final_eval_loss(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(line) for line in open(path) if "eval_loss" in line]
  return rows[-1]["eval_loss"] if rows else None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--variants", nargs="+", default=["svd", "randomized", "8bit"], choices=sorted(VARIANTS))
  ap.add_argument("--workdir", default="/tmp/tiny_quality")
  ap.add_argument("--collect_only", action="store_true", help="read finished runs, start none")
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tiny_quality-cpu.json"))
  args = ap.parse_args()

  runs = {}
  for seed in args.seeds:
    for variant in args.variants:
      workdir = os.path.join(args.workdir, f"{variant}_s{seed}")
      cmd = [sys.executable, "train.py", "--config", "configs/tiny.py", f"--config.workdir={workdir}",
             f"--config.seed={seed}", *VARIANTS[variant]]
      if not args.collect_only and final_eval_loss(workdir) is None:
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
      if final_eval_loss(workdir) is not None:  # --collect_only: runs that were not made are left out
        runs[f"{variant}_s{seed}"] = {"variant": variant, "seed": seed, "eval_loss": final_eval_loss(workdir),
                                      "command": " ".join(["python"] + cmd[1:])}
  for name, r in runs.items():
    base = runs.get(f"svd_s{r['seed']}", {}).get("eval_loss")
    if base and r["eval_loss"]:
      r["rel_diff_to_svd_same_seed"] = r["eval_loss"] / base - 1
  baselines = [r["eval_loss"] for r in runs.values() if r["variant"] == "svd" and r["eval_loss"]]
  import jax

  record = {
      "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
      "device": f"cpu: {os.cpu_count()} cores", "backend": "cpu",
      "versions": {"jax": jax.__version__, "python": platform.python_version()},
      "config": "configs/tiny.py (400 steps, llama_20m vocab 4096, rank 64, update_proj_gap 100)",
      "svd_seed_spread": (max(baselines) / min(baselines) - 1) if len(baselines) > 1 else None,
      "runs": runs,
  }
  with open(args.out, "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps({k: round(v["rel_diff_to_svd_same_seed"], 4) for k, v in runs.items()
                    if "rel_diff_to_svd_same_seed" in v} | {"svd_seed_spread": record["svd_seed_spread"]}))


if __name__ == "__main__":
  main()
