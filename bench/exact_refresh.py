"""The exact refresh by the Gram matrix's eigenvectors (refresh="gram") against a direct SVD (refresh="svd").

  python -m bench.exact_refresh [--preset llama_60m] [--steps 20] [--later 10] [--rank R] [--repeats 3]
                                [--deflations 0] [--shapes_preset P] [--shapes_repeats 2] [--out PATH]

1. real gradients: a byte-level (vocab 256) --preset model trained --steps steps with optax.adamw on the embedded
   corpus (as bench/refresh.py); at the last step every attention/MLP kernel's gradient (Flax layout, 'std' sides,
   rank from the preset's paper config unless --rank) is refreshed by `gram_basis` (with --deflations deflated passes)
   and by `svd_basis`
   (`jnp.linalg.svd`), each jitted one matrix at a time; per matrix: the energy captured by the Gram basis over that
   of the SVD basis, their subspace overlap (mean squared cosine of the principal angles) and the largest entry of
   the difference of their projectors, and the condition `σ_r / σ_1`; with --later K, the two bases' energy ratio
   on the gradient K AdamW steps later (a basis serves a whole gap: does the Gram basis's tail matter?); per kernel
   shape: seconds per matrix (median over every matrix of that shape and --repeats passes, after one warm-up call,
   the two methods' calls alternating) of both, and of the Gram method batched over all matrices of the shape (one
   stacked call, divided by their count).
2. with --shapes_preset (e.g. llama_1b): the same two timings on each distinct kernel shape of that preset at its
   paper rank, on one synthetic gradient per shape (bench/refresh.py's power-law spectrum, alpha 1), --shapes_repeats
   calls each; energy ratio and overlap on it.

Writes bench/results/exact_refresh-<platform>-<preset>.json after each phase and prints the summary as one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from galore_jax import gram_basis, plan_leaves, svd_basis
from galore_jax.models import llama
from galore_jax.optim import basis as projection
from galore_jax.train import data, steps

SEQ_LEN, BATCH = 128, 16


def real_gradients(preset: str, n_steps: int, max_bytes: int, later: int = 0) -> tuple[Any, Any, float]:
  """The gradients of the byte-level ``preset`` after ``n_steps`` AdamW steps, those ``later`` steps after them
  (None when ``later`` is 0), and the last loss."""
  from bench import refresh  # its corpus, model and gradient (one definition of the byte-level setup)

  train_rows, _ = refresh.byte_rows(max_bytes)
  graphdef, params = refresh.small_model(preset)
  tx = optax.adamw(1e-3)
  train = steps.make_steps(graphdef, tx, grad_accum=1, packed=True).train
  opt_state, batches, loss = tx.init(params), data.Batches(train_rows, BATCH, seed=0), float("nan")
  for _ in range(n_steps):
    params, opt_state, metrics = train(params, opt_state, next(batches))
    loss = float(metrics["loss"])
  gradient = refresh.gradient_fn(graphdef)
  grads = gradient(params, next(batches))
  for _ in range(later):
    params, opt_state, metrics = train(params, opt_state, next(batches))
  return grads, gradient(params, next(batches)) if later else None, loss


def compare(g, rank: int, sides, g_later=None, deflations: int = 0) -> dict:
  """Energy ratio, overlap, projector difference and ``σ_r / σ_1`` of the Gram basis against the SVD's; with
  ``g_later``, the energy ratio of the two bases on that later gradient (a basis serves a whole gap)."""
  gram, exact = gram_basis(g, rank, sides, deflations=deflations), svd_basis(g, rank, sides)
  s = jnp.linalg.svd(g, compute_uv=False)
  gaps = [float(jnp.max(jnp.abs(a @ a.T - b @ b.T))) for a, b in zip(gram, exact) if a is not None]
  out = {"energy_ratio": float(projection.captured_energy(g, gram) / projection.captured_energy(g, exact)),
         "exact_energy": float(projection.captured_energy(g, exact)),
         "overlap": float(projection.subspace_overlap(gram, exact)), "max_projector_diff": max(gaps),
         "sigma_r_over_sigma_1": float(s[rank - 1] / s[0])}
  if g_later is not None:
    out["later_exact_energy"] = float(projection.captured_energy(g_later, exact))
    out["later_energy_ratio"] = float(projection.captured_energy(g_later, gram)) / out["later_exact_energy"]
  return out


def compiled(fn, example):
  """``fn`` compiled for ``example``'s shape and called once (so that no timed call holds a compile)."""
  run = jax.jit(fn).lower(example).compile()
  jax.block_until_ready(run(example))
  return run


def time_shape(mats: list, rank: int, sides, repeats: int, batched: bool = True, deflations: int = 0) -> dict:
  """Per-matrix seconds (medians) of the Gram method, alone and batched over ``mats``, and of the direct SVD.

  The two methods' calls alternate, matrix by matrix, so that a change of the machine's load between them
  (a shared CPU) moves both alike; the speedup is the ratio of the medians.
  """
  gram = compiled(lambda g: gram_basis(g, rank, sides, deflations=deflations), mats[0])
  svd = compiled(lambda g: svd_basis(g, rank, sides), mats[0])
  samples = {"gram_s": [], "svd_s": []}
  for _ in range(repeats):
    for m in mats:
      samples["gram_s"].append(common.seconds(gram, m)[1])
      samples["svd_s"].append(common.seconds(svd, m)[1])
  out = {k: statistics.median(v) for k, v in samples.items()}
  if batched and len(mats) > 1:
    stacked = jnp.stack(mats)
    both = compiled(lambda g: gram_basis(g, rank, sides, deflations=deflations), stacked)
    out["gram_batched_s"] = statistics.median(common.seconds(both, stacked)[1] for _ in range(repeats)) / len(mats)
  out["speedup"] = out["svd_s"] / out["gram_s"]
  return out


def real_phase(args) -> dict:
  start = time.perf_counter()
  grads, later, loss = real_gradients(args.preset, args.steps, args.max_bytes, args.later)
  _, plans, _ = plan_leaves(grads, rank=args.rank)
  rows, by_shape = [], {}
  later_leaves = [None] * len(plans) if later is None else jax.tree.leaves(later)
  for p, g, g_later in zip(plans, jax.tree.leaves(grads), later_leaves):
    if p is not None:
      g = jnp.asarray(g, jnp.float32)
      rows.append({"path": p.path, "shape": [p.m, p.n], "rank": p.rank,
                   **compare(g, p.rank, p.sides, g_later, args.deflations)})
      by_shape.setdefault((p.m, p.n, p.rank, p.sides), []).append(g)
  timing = []
  for (m, n, rank, sides), mats in by_shape.items():
    timing.append({"shape": [m, n], "rank": rank, "matrices": len(mats),
                   **time_shape(mats, rank, sides, args.repeats, deflations=args.deflations)})
  model = {k: sum(t[k] * t["matrices"] for t in timing) for k in ("gram_s", "svd_s")}
  if all("gram_batched_s" in t for t in timing):
    model["gram_batched_s"] = sum(t["gram_batched_s"] * t["matrices"] for t in timing)
  return {"model": f"{args.preset}, vocab 256 (bytes of the embedded corpus, packed rows), adamw 1e-3, "
                   f"batch {BATCH}x{SEQ_LEN}", "steps": args.steps, "loss": loss, "rank": args.rank,
          "matrices": len(rows), "timing_by_shape": timing, "model_refresh_s": model,
          "model_speedup": model["svd_s"] / model["gram_s"],
          "min_energy_ratio": min(r["energy_ratio"] for r in rows),
          "mean_energy_ratio": float(np.mean([r["energy_ratio"] for r in rows])),
          "min_overlap": min(r["overlap"] for r in rows),
          "max_projector_diff": max(r["max_projector_diff"] for r in rows),
          "min_sigma_r_over_sigma_1": min(r["sigma_r_over_sigma_1"] for r in rows),
          "later_steps": args.later, **({} if not args.later else {
              "min_later_energy_ratio": min(r["later_energy_ratio"] for r in rows),
              "mean_later_energy_ratio": float(np.mean([r["later_energy_ratio"] for r in rows]))}),
          "wall_s": time.perf_counter() - start, "per_matrix": rows}


def shapes_phase(args) -> dict:
  from bench import refresh

  cfg = llama.preset(args.shapes_preset)
  rank = common.rank(args.shapes_preset)
  _, plans, _ = plan_leaves({"mlp": {name: jnp.zeros(shape) for name, shape in
                                     common.layer_kernels(cfg).items()}}, target=".*", rank=rank)
  seen, rows = set(), []
  for i, p in enumerate(plans):
    if p is None or (p.m, p.n) in seen:
      continue
    seen.add((p.m, p.n))
    g = refresh.synthetic(jax.random.key(i), p.m, p.n, 1.0)
    rows.append({"shape": [p.m, p.n], "rank": p.rank, "matrices_in_model": cfg.num_hidden_layers * sum(
        1 for s in common.layer_kernels(cfg).values() if s == (p.m, p.n)),
        **time_shape([g], p.rank, p.sides, args.shapes_repeats, batched=False, deflations=args.deflations),
        **compare(g, p.rank, p.sides, deflations=args.deflations)})
  model = {k: sum(r[k] * r["matrices_in_model"] for r in rows) for k in ("gram_s", "svd_s")}
  return {"preset": args.shapes_preset, "rank": rank, "gradients": "synthetic: Gaussian factors, power-law spectrum "
          "i^-1 on 1024 directions + 1e-4 noise (bench/refresh.py)", "by_shape": rows,
          "model_refresh_s_extrapolated": model, "model_speedup": model["svd_s"] / model["gram_s"]}


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_60m", choices=common.PRESETS, help="byte-level model of phase 1")
  ap.add_argument("--steps", type=int, default=20, help="AdamW steps before the gradients are taken")
  ap.add_argument("--later", type=int, default=10, help="also compare the two bases on the gradient this many "
                  "AdamW steps later (0: not)")
  ap.add_argument("--rank", type=int, default=None, help="default: the preset's paper rank (128 for llama_60m)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--deflations", type=int, default=0, help="deflated passes of the Gram method (refresh='gram' "
                  "uses galore_jax.GRAM_DEFLATIONS)")
  ap.add_argument("--shapes_preset", default=None, choices=common.PRESETS, help="also time one synthetic matrix "
                  "of each kernel shape of this preset (e.g. llama_1b)")
  ap.add_argument("--shapes_repeats", type=int, default=2)
  ap.add_argument("--max_bytes", type=int, default=2_000_000, help="bytes of the embedded corpus to train on")
  ap.add_argument("--out", default=None, help="default bench/results/exact_refresh-<platform>-<preset>.json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.rank = args.rank or common.rank(args.preset)
  if args.steps < 0 or args.later < 0:
    common.fail(f"--steps {args.steps} and --later {args.later} must be at least 0")
  if args.deflations < 0:
    common.fail(f"--deflations {args.deflations} must be at least 0")
  if args.repeats < 1 or args.shapes_repeats < 1:
    common.fail(f"--repeats {args.repeats} and --shapes_repeats {args.shapes_repeats} must be at least 1")
  args.out = args.out or os.path.join(common.RESULTS, f"exact_refresh-{jax.devices()[0].platform}-{args.preset}.json")
  return args


def summary(record: dict) -> dict:
  real, shapes = record["real_gradients"], record["shapes"]
  return {"preset": record["preset"], "rank": record["rank"], "deflations": record.get("deflations", 0),
          "model_gram_s": real and real["model_refresh_s"]["gram_s"],
          "model_svd_s": real and real["model_refresh_s"]["svd_s"],
          "model_speedup": real and real["model_speedup"], "min_energy_ratio": real and real["min_energy_ratio"],
          "min_later_energy_ratio": real and real.get("min_later_energy_ratio"),
          "min_overlap": real and real["min_overlap"],
          "shapes_preset": shapes and shapes["preset"], "shapes_model_speedup": shapes and shapes["model_speedup"]}


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  record = {**common.provenance(__spec__.name, argv), "preset": args.preset, "rank": args.rank,
            "deflations": args.deflations,
            "load_average_at_start": os.getloadavg()[0], "real_gradients": None, "shapes": None}
  write = lambda: common.write_json(args.out, {**record, "summary": summary(record)})
  record["real_gradients"] = real_phase(args)
  write()
  if args.shapes_preset:
    record["shapes"] = shapes_phase(args)
    write()
  record["load_average_at_end"] = os.getloadavg()[0]  # a shared CPU: how busy it was around the timings
  record["summary"] = summary(record)
  write()
  print(json.dumps(record["summary"]))
  return record


if __name__ == "__main__":
  main()
