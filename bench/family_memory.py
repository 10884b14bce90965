"""Optimizer state bytes of the low-rank family (GaLore, Fira, APOLLO, APOLLO-Mini, GoLore, Q-GaLore) beside AdamW,
analytic.

  python -m bench.family_memory [--presets llama_7b llama_1b] [--out PATH]

Writes bench/results/family_memory-analytic.json. Nothing is allocated: the parameters are the abstract model's
``ShapeDtypeStruct`` s and the state is ``jax.eval_shape(tx.init, params)`` of the app's optimizer for that config
(``galore_jax.train.dry_run.analytic``), split by ``galore_jax.optim.introspect.state_breakdown``. Settings: bf16
weights, and per variant the state dtype it names; ranks as the papers (GaLore and Fira: 1024 at 7B, 512 at 1B;
APOLLO: 256 at 7B, the rank at which its bf16 moments are the APOLLO paper's 1.6 GB, and 512 at 1B, "GaLore's
memory" of its Table 2; APOLLO-Mini: 1; GoLore and Q-GaLore: GaLore's; Q-GaLore's bases int4 with an fp32 scale and
zero point per 256 values). Embeddings, lm_head and norms get full-rank Adam in every method (as the references'
scripts), so ``projected_matrices_gb`` (low-rank moments + projections + limiter norms) is the column to hold
against the papers' optimizer-state figures, which count the projected matrices.
"""

from __future__ import annotations

import os
import sys

from bench import common
from configs.base import base
from galore_jax.train import dry_run

GB = 1e9
RANKS = {  # (GaLore / Fira, APOLLO)
    "llama_7b": (1024, 256),
    "llama_1b": (512, 512),
}
# The APOLLO paper (arXiv 2412.05270), LLaMA-7B optimizer states (bf16 unless 8-bit); Fira keeps GaLore's states.
PAPER_7B_GB = {"adamw_8bit": 13.0, "galore_adamw_8bit": 4.9, "apollo_adamw": 1.6, "apollo_mini": 0.0}


def variants(preset: str) -> dict[str, dict]:
  galore_rank, apollo_rank = RANKS[preset]
  bf16 = dict(moment_dtype="bfloat16", basis_dtype="bfloat16")
  fp32 = dict(moment_dtype="float32", basis_dtype="float32")
  return {
      "adamw (bf16 states)": dict(name="adamw", moment_dtype="bfloat16"),
      "adamw_8bit": dict(name="adamw_8bit"),
      "galore_adamw (bf16 states)": dict(name="galore_adamw", rank=galore_rank, **bf16),
      "galore_adamw_8bit (bf16 bases)": dict(name="galore_adamw_8bit", rank=galore_rank, basis_dtype="bfloat16"),
      "fira_adamw (bf16 states)": dict(name="fira_adamw", rank=galore_rank, **bf16),
      "apollo_adamw (bf16 states)": dict(name="apollo_adamw", rank=apollo_rank, **bf16),
      "apollo_mini (bf16 states)": dict(name="apollo_mini", **bf16),
      "golore_adamw (bf16 states)": dict(name="golore_adamw", rank=galore_rank, golore_switch_step=0, **bf16),
      "q_galore_adamw (int4 bases, bf16 moments)": dict(name="q_galore_adamw", rank=galore_rank,
                                                          moment_dtype="bfloat16"),
      "galore_adamw (fp32 states)": dict(name="galore_adamw", rank=galore_rank, **fp32),
      "fira_adamw (fp32 states)": dict(name="fira_adamw", rank=galore_rank, **fp32),
      "apollo_adamw (fp32 states)": dict(name="apollo_adamw", rank=apollo_rank, **fp32),
      "apollo_mini (fp32 states)": dict(name="apollo_mini", **fp32),
  }


def config_for(preset: str, optimizer: dict):
  cfg = base()
  cfg.model.preset = preset
  cfg.model.param_dtype = cfg.model.dtype = "bfloat16"
  cfg.data.seq_len, cfg.train.batch_size, cfg.train.grad_accum = 256, 1, 1
  cfg.optimizer.update(optimizer)
  return cfg


def row(preset: str, label: str, optimizer: dict) -> dict:
  report = dry_run.analytic(config_for(preset, optimizer))
  keys = ("optimizer_state_gb", "moments_low_rank_gb", "projector_bases_gb", "rule_states_gb", "full_rank_states_gb")
  out = {"preset": preset, "variant": label, "optimizer": report["optimizer"], "rank": report["rank"],
         "params": report["params"], "weights_gb": report["weights_gb"], **{k: report[k] for k in keys}}
  out["projected_matrices_gb"] = out["moments_low_rank_gb"] + out["projector_bases_gb"] + out["rule_states_gb"]
  if preset == "llama_7b" and report["optimizer"] in PAPER_7B_GB and "fp32" not in label:
    out["paper_7b_state_gb"] = PAPER_7B_GB[report["optimizer"]]
  return out


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--presets", nargs="+", default=list(RANKS), choices=list(RANKS))
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "family_memory-analytic.json"))
  return ap


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  rows = [row(preset, label, optimizer) for preset in args.presets for label, optimizer in variants(preset).items()]
  record = {**common.provenance(__spec__.name, argv),
            "note": "analytic: jax.eval_shape of the optimizer's init on the abstract model, nothing allocated",
            "ranks": {p: {"galore_fira_golore_q_galore": g, "apollo": a, "apollo_mini": 1}
                      for p, (g, a) in RANKS.items()},
            "paper_7b_state_gb": PAPER_7B_GB, "results": rows}
  print(f"{'preset':<9} {'variant':<42} {'rank':>5} {'state':>8} {'projected':>10} {'full-rank':>10} {'paper':>6}  GB")
  for r in rows:
    paper = r.get("paper_7b_state_gb")
    print(f"{r['preset']:<9} {r['variant']:<42} {r['rank'] or '':>5} {r['optimizer_state_gb']:>8.3f} "
          f"{r['projected_matrices_gb']:>10.3f} {r['full_rank_states_gb']:>10.3f} {'' if paper is None else paper:>6}")
  print(f"wrote {common.write_json(args.out, record)}")
  return record


if __name__ == "__main__":
  main()
