"""Fast subspace refresh: quality on real Llama gradients, time on a preset's kernel shapes, and a short training run.

  python -m bench.refresh [--preset llama_1b] [--layers 1] [--exact_layers N] [--rank R] [--fast a,b]
                          [--exact_algorithms a,b] [--model llama_20m] [--quality_steps 200]
                          [--train_steps 300] [--skip_quality] [--skip_train] [--out PATH]

1. quality: a byte-level (vocab 256) llama_20m (--model) trained with optax.adamw on the embedded corpus (the Python
   standard library's source, galore_jax.train.data, packed rows of 128 bytes); the gradients of its
   attention/MLP kernels at step N (and N - gap, as the previous basis of the warm start) are refreshed exactly
   and by each fast refresh at rank 64; per matrix: energy captured by the fast basis over that of the exact
   top-r basis, and the subspace overlap (mean squared cosine of principal angles), for each refresh of --fast.
2. time: one refresh of all attention/MLP kernels of `--layers` layers of `--preset` (Flax layout, std sides;
   shapes from galore_jax.models.llama, rank from the preset's paper config, bench/common.py), measured on a
   jitted update that returns only the new state (XLA drops the projections), best of --repeats; the fast
   refreshes first (and, with --layers > 1, the default one with batch_refresh=True unless --skip_batch_refresh),
   then the fast exact refresh (refresh="gram": the Gram matrix's eigenvectors; its result key is "svd") on
   --exact_layers of them, scaled to the same layer count, and with --direct_layers N the direct SVD (refresh="svd")
   on N layers, scaled.
   The gradients are synthetic: Gaussian factors with a power-law spectrum s_i = i^-alpha (alpha from --alpha),
   energy ratios are measured on them. Full-model figures are scaled per layer and flagged as extrapolated
   unless every layer was timed.
3. train: galore_adamw (rank 64, gap 50) on the byte-level llama_20m, exact vs fast refreshes (--train_refreshes),
   same data and seed; eval loss on held-out text.

The results file is rewritten after each phase and after each timed refresh, so a later failure or time limit
keeps what was measured. Prints a final JSON line {exact_s, fast_s, speedup, min_energy_ratio, ...} and writes
bench/results/refresh-<platform>-<preset>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench import common
from galore_jax import ExactRefresh, RandomizedRefresh, galore, galore_adamw, plan_leaves
from galore_jax.models import llama
from galore_jax.optim import basis as projection, refresh as refresh_lib
from galore_jax.train import data, steps

FAST = {  # all: oversampling 10; names hold no comma (the --fast separator)
    "randomized": RandomizedRefresh(),  # the default: q = 1, LU-stabilised
    "randomized(q=0)": RandomizedRefresh(iterations=0),
    "randomized(q=2)": RandomizedRefresh(iterations=2),
    "randomized(qr)": RandomizedRefresh(iterations=1, stabilizer="qr"),
    "randomized_warm": RandomizedRefresh(iterations=0, warm_start=True),  # refresh="randomized_warm"
    "warm(q=1)": RandomizedRefresh(iterations=1, warm_start=True),
    # the default with its finish (k x k eigh) run one matrix at a time instead of batched per shape group
    "randomized(finish unbatched)": RandomizedRefresh(batch_budget_bytes=0),
    "randomized(jacobi eigh)": RandomizedRefresh(eigh_algorithm="jacobi"),
}
EXACT = "gram"  # the exact refresh timed on --exact_layers (the direct SVD on --direct_layers)
TRAIN_REFRESHES = {"svd": "svd", **FAST}  # phase 3's choices: the exact refresh (the baseline) and the fast ones
SEQ_LEN, BATCH = 128, 16


# ----------------------------------------------------------------------------- data and model


def byte_rows(max_bytes: int = 8_000_000) -> tuple[data.Rows, data.Rows]:
  """Training and validation rows of the embedded corpus as bytes (vocab 256), packed, split by document."""
  train_docs, val_docs = data.split_documents(data.stdlib_documents(max_bytes), 0.05)

  def rows(documents):
    encoded = [np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32) for d in documents]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
    return data.Rows(np.concatenate(encoded), offsets, SEQ_LEN, packing=True, pad_id=0)

  return rows(train_docs), rows(val_docs)


def small_model(preset: str, seed: int = 0):
  """(graphdef, params) of the byte-level model (vocab 256) of phases 1 and 3."""
  model = llama.Llama(llama.preset(preset, vocab_size=256, max_position_embeddings=256), rngs=nnx.Rngs(seed))
  return nnx.graphdef(model), steps.params_of(model)


def gradient_fn(graphdef):
  """The gradient of the per-token mean loss, as the train step computes it (galore_jax.train.steps)."""
  def mean_loss(params, batch):
    loss, tokens = steps.loss_and_tokens(nnx.merge(graphdef, params), batch, packed=True)
    return loss / tokens

  return jax.jit(jax.grad(mean_loss))


# ----------------------------------------------------------------------------- 1. quality on real gradients


def quality(preset: str, train_rows: data.Rows, n_steps: int, gap: int, rank: int,
            fast: list[str]) -> tuple[list[dict], float]:
  """Per matrix of the small model at step ``n_steps`` of AdamW: each fast basis's energy ratio and overlap."""
  graphdef, params = small_model(preset)
  tx = optax.adamw(1e-3)
  train = steps.make_steps(graphdef, tx, grad_accum=1, packed=True).train
  gradient = gradient_fn(graphdef)
  opt_state = tx.init(params)
  batches = data.Batches(train_rows, BATCH, seed=0)
  grads_at = {}
  for t in range(n_steps + 1):
    batch = next(batches)
    if t in (n_steps - gap, n_steps):
      grads_at[t] = jax.tree.leaves(gradient(params, batch))
    params, opt_state, metrics = train(params, opt_state, batch)
  _, plans, _ = plan_leaves(params, rank=rank)
  rows = []
  for j, p in enumerate(plans):
    if p is not None:
      g_prev, g = (jnp.asarray(grads_at[t][j], jnp.float32) for t in (n_steps - gap, n_steps))
      rows.append(quality_row(p, g, g_prev, jax.random.fold_in(jax.random.key(0), j), fast))
  return rows, float(metrics["loss"])


def quality_row(p, g, g_prev, key, fast: list[str]) -> dict:
  exact = refresh_lib.svd_basis(g, p.rank, p.sides)
  prev = refresh_lib.svd_basis(g_prev, p.rank, p.sides)
  e_exact = float(projection.captured_energy(g, exact))
  s = np.asarray(jnp.linalg.svd(g, compute_uv=False))
  row = {"path": p.path, "shape": [p.m, p.n], "rank": p.rank, "exact_energy": e_exact,
         "spectrum_alpha": float(-np.polyfit(np.log(np.arange(1, len(s) + 1)), np.log(s + 1e-30), 1)[0]),
         "previous_basis_energy_ratio": float(projection.captured_energy(g, prev)) / e_exact}
  for name in fast:
    b = FAST[name](g, prev, p.rank, key=key, warm=True)
    row[name] = {"energy_ratio": float(projection.captured_energy(g, b)) / e_exact,
                 "overlap": float(projection.subspace_overlap(b, exact))}
  return row


def quality_summary(rows: list[dict], fast: list[str]) -> dict:
  return {name: {"min_energy_ratio": min(r[name]["energy_ratio"] for r in rows),
                 "mean_energy_ratio": float(np.mean([r[name]["energy_ratio"] for r in rows])),
                 "min_overlap": min(r[name]["overlap"] for r in rows)} for name in fast}


# ----------------------------------------------------------------------------- 2. time on a preset's kernel shapes


def synthetic(key, m, n, alpha, d=1024):
  """Gaussian factors with a power-law spectrum on the first `d` directions (and a small noise floor)."""
  k1, k2, k3 = jax.random.split(key, 3)
  s = jnp.arange(1, d + 1, dtype=jnp.float32) ** -alpha
  a = jax.random.normal(k1, (m, d)) / np.sqrt(m)
  b = jax.random.normal(k2, (d, n)) / np.sqrt(n)
  return (a * s) @ b + 1e-4 * jax.random.normal(k3, (m, n)) / np.sqrt(n)


def kernel_grads(preset: str, layers: int, alpha: float) -> dict:
  """Synthetic gradients of the attention/MLP kernels of the first ``layers`` layers, in the model's tree layout."""
  tree, i, kernels = {}, 0, common.layer_kernels(llama.preset(preset))
  for layer in range(layers):
    for name, shape in kernels.items():
      module, proj = name.split("/")
      tree.setdefault(layer, {}).setdefault(module, {})[proj] = {"kernel": synthetic(jax.random.key(i), *shape, alpha)}
      i += 1
  return {"layers": tree}


def first_layers(grads: dict, n: int) -> dict:
  return {"layers": {k: v for k, v in grads["layers"].items() if k < n}}


def time_refresh(grads, rank, refresh, batch_refresh=False, repeats=2):
  """Seconds of one refresh of every leaf of `grads` (best of `repeats` >= 1, compiled and warm), and the bases.

  Only the new optimizer state is returned from the jitted update, so XLA drops the projections: what runs
  is the refresh branch (count = gap: a refresh with a previous basis, so warm starts are warm).
  """
  tx = galore(optax.identity(), rank=rank, update_proj_gap=10, refresh=refresh, batch_refresh=batch_refresh)
  new_state = jax.jit(lambda g, s: tx.update(g, s)[1])
  # Step 0 compiles the update and refreshes too (cold): it warms the executable up and gives the previous bases.
  fresh = jax.block_until_ready(new_state(grads, tx.init(grads)))
  on = fresh._replace(count=jnp.int32(10))
  samples = []
  for _ in range(repeats):
    state, seconds = common.seconds(new_state, grads, on)
    samples.append(seconds)
  return min(samples), state.bases


def timing(args, alpha: float, write) -> dict:
  """The fast refreshes on all ``args.layers`` layers, then the exact refresh on ``args.exact_layers`` and the direct
  SVD on ``args.direct_layers`` (each scaled to ``args.layers``); energy ratios on the exactly refreshed layers.
  ``write(results)`` after each refresh."""
  grads = kernel_grads(args.preset, args.layers, alpha)
  small = first_layers(grads, args.exact_layers)
  scale = args.layers / args.exact_layers
  _, plans, _ = plan_leaves(small, target=".*", rank=args.rank)
  results, fast_bases = {}, {}
  for name in args.fast:
    s, bases = time_refresh(grads, args.rank, FAST[name], repeats=args.repeats)
    results[name] = {"refresh_s": s, "measured_layers": args.layers}
    fast_bases[name] = {p.path: bases[p.path] for p in plans}
    write(results)
  if args.layers > 1 and not args.skip_batch_refresh:
    s, _ = time_refresh(grads, args.rank, FAST["randomized"], batch_refresh=True, repeats=args.repeats)
    results["randomized+batch_refresh"] = {"refresh_s": s, "measured_layers": args.layers}
    write(results)
  exact_s, exact_bases = time_refresh(small, args.rank, EXACT, repeats=args.repeats)
  results["svd"] = {"refresh_s": exact_s * scale, "measured_layers": args.exact_layers}
  mats = dict(zip([p.path for p in plans], jax.tree.leaves(small)))
  e_exact = {path: float(projection.captured_energy(g, exact_bases[path])) for path, g in mats.items()}
  for name, r in results.items():
    r["speedup"] = exact_s * scale / r["refresh_s"]
    if name in fast_bases:
      r["min_energy_ratio"] = min(float(projection.captured_energy(g, fast_bases[name][path])) / e_exact[path]
                                  for path, g in mats.items())
      r["exact_energy_min"] = min(e_exact.values())
  write(results)
  if args.direct_layers:
    direct_scale = args.layers / args.direct_layers
    s, _ = time_refresh(first_layers(grads, args.direct_layers), args.rank, "svd_direct", repeats=args.repeats)
    results["svd_direct"] = {"refresh_s": s * direct_scale, "measured_layers": args.direct_layers,
                             "speedup": exact_s * scale / (s * direct_scale)}
    write(results)
  for algorithm in args.exact_algorithms:
    s, _ = time_refresh(small, args.rank, ExactRefresh(svd_algorithm=algorithm), repeats=args.repeats)
    results[f"svd({algorithm})"] = {"refresh_s": s * scale, "measured_layers": args.exact_layers,
                                    "speedup": exact_s / s}
    write(results)
  return results


# ----------------------------------------------------------------------------- 3. training


def train_compare(preset, train_rows, val_rows, n_steps, rank, gap, refreshes) -> dict:
  """galore_adamw with each refresh on the byte-level model, same data and seed: train and eval loss."""
  out = {}
  for name, refresh in refreshes.items():
    graphdef, params = small_model(preset, seed=0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, n_steps // 10, n_steps, 0.001)
    tx = galore_adamw(schedule, rank=rank, update_proj_gap=gap, scale=0.25, refresh=refresh)
    step_fns = steps.make_steps(graphdef, tx, grad_accum=1, packed=True)
    opt_state = tx.init(params)
    batches = data.Batches(train_rows, BATCH, seed=1)
    start = time.perf_counter()
    for _ in range(n_steps):
      params, opt_state, metrics = step_fns.train(params, opt_state, next(batches))
    sums = [step_fns.eval(params, batch) for batch in data.eval_batch_list(val_rows, BATCH, 20)]
    eval_loss = float(sum(loss for loss, _ in sums) / sum(tokens for _, tokens in sums))
    out[name] = {"train_loss": float(metrics["loss"]), "eval_loss": eval_loss, "wall_s": time.perf_counter() - start}
    print(f"train {name}: eval loss {eval_loss:.4f}", flush=True)
  base = out["svd"]["eval_loss"]
  for name in out:
    out[name]["eval_loss_rel_diff"] = out[name]["eval_loss"] / base - 1
  return out


# ----------------------------------------------------------------------------- the results file


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_1b", choices=common.PRESETS, help="kernel shapes to time")
  ap.add_argument("--layers", type=int, default=1, help="layers to time the fast refreshes on (llama_1b has 24, "
                  "llama_7b 32); the full-model figures scale by layers_in_model / layers")
  ap.add_argument("--exact_layers", type=int, default=None, help="layers to time the exact refresh on (default "
                  "--layers)")
  ap.add_argument("--direct_layers", type=int, default=0, help="layers to time the direct SVD (refresh='svd_direct') "
                  "on, after the exact refresh (0: not timed)")
  ap.add_argument("--rank", type=int, default=None, help="default: the preset's paper rank (512 for 1b, 1024 for 7b)")
  ap.add_argument("--exact_algorithms", default="", help="comma-separated svd_algorithm values to time as well "
                  "(ExactRefresh(svd_algorithm=...), e.g. jacobi, qr)")
  ap.add_argument("--fast", default=common.SEPARATOR.join(FAST), help="comma-separated fast refreshes to time: " +
                  ", ".join(FAST))
  ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the synthetic spectrum "
                  "(0: the median fitted on the real llama_20m gradients, which is steep, ~3)")
  ap.add_argument("--model", default="llama_20m", choices=common.PRESETS, help="the byte-level model of phases 1 "
                  "and 3")
  ap.add_argument("--quality_steps", type=int, default=200)
  ap.add_argument("--train_steps", type=int, default=300)
  ap.add_argument("--train_refreshes", default="svd,randomized,randomized_warm", help="comma-separated refreshes "
                  "of phase 3, svd (the baseline, always run) and any of --fast's choices")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--max_bytes", type=int, default=8_000_000, help="bytes of the embedded corpus to train on")
  ap.add_argument("--skip_quality", action="store_true")
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--skip_batch_refresh", action="store_true", help="do not time randomized+batch_refresh (the "
                  "default refresh with batch_refresh=True, timed when --layers > 1)")
  ap.add_argument("--out", default=None, help="default bench/results/refresh-<platform>-<preset>.json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.fast = common.choose(args.fast, FAST, "fast refresh")
  args.train_refreshes = ["svd"] + [n for n in common.choose(args.train_refreshes, TRAIN_REFRESHES, "train refresh")
                                    if n != "svd"]
  args.exact_algorithms = [a for a in args.exact_algorithms.split(common.SEPARATOR) if a]
  args.rank = args.rank or common.rank(args.preset)
  args.exact_layers = args.exact_layers or args.layers
  args.model_layers = llama.PRESETS[args.preset].num_hidden_layers
  if not 1 <= args.layers <= args.model_layers:
    common.fail(f"--layers {args.layers} is not within 1..{args.model_layers} ({args.preset})")
  if not 1 <= args.exact_layers <= args.layers:
    common.fail(f"--exact_layers {args.exact_layers} is not within 1..--layers {args.layers}")
  if not 0 <= args.direct_layers <= args.layers:
    common.fail(f"--direct_layers {args.direct_layers} is not within 0..--layers {args.layers}")
  if args.quality_steps < 2:
    common.fail(f"--quality_steps {args.quality_steps} must be at least 2")
  if args.repeats < 1:
    common.fail(f"--repeats {args.repeats} must be at least 1")
  args.out = args.out or os.path.join(common.RESULTS, f"refresh-{jax.devices()[0].platform}-{args.preset}.json")
  return args


def final_figures(args, timings: dict, summary_q: dict) -> dict:
  """The headline: exact vs the default randomized refresh (None where not measured yet)."""
  fast_name = "randomized" if "randomized" in timings else next(iter(args.fast), None)
  exact, fast = timings.get("svd", {}), timings.get(fast_name, {})
  per_model = args.model_layers / args.layers
  ratios = [fast.get("min_energy_ratio")] + [summary_q.get(fast_name, {}).get("min_energy_ratio")]
  scaled = lambda r: r["refresh_s"] * per_model if r else None
  quality_ok = lambda n: summary_q.get(n, {}).get("min_energy_ratio", 1.0) >= 0.99
  good = [n for n, r in timings.items() if r.get("min_energy_ratio", 0) >= 0.99 and quality_ok(n)]
  final = {
      "preset": args.preset, "rank": args.rank, "fast": fast_name,
      "exact_s": exact.get("refresh_s"), "fast_s": fast.get("refresh_s"), "speedup": fast.get("speedup"),
      "min_energy_ratio": min([r for r in ratios if r is not None], default=None),
      "layers_timed": args.layers, "exact_layers_timed": args.exact_layers,
      "fastest_at_0.99": min(good, key=lambda n: timings[n]["refresh_s"], default=None),
      f"exact_s_{args.model_layers}_layers": scaled(exact), f"fast_s_{args.model_layers}_layers": scaled(fast),
      "full_model_is_extrapolated": {"exact": args.exact_layers != args.model_layers,
                                     "fast": args.layers != args.model_layers},
  }
  if "randomized+batch_refresh" in timings:
    final[f"fast_batched_s_{args.model_layers}_layers"] = scaled(timings["randomized+batch_refresh"])
  if "svd_direct" in timings:  # exact_s is refresh="gram" (the Gram eigensolver); this is the direct SVD's
    final["direct_svd_s"] = timings["svd_direct"]["refresh_s"]
    final[f"direct_svd_s_{args.model_layers}_layers"] = scaled(timings["svd_direct"])
    final["direct_layers_timed"] = args.direct_layers
  return final


def record(args, provenance, rows, summary_q, alpha, timings, train) -> dict:
  return {
      **provenance,
      "quality_real_gradients": None if not rows else {
          "model": f"{args.model}, vocab 256 (bytes of the embedded corpus, packed rows), adamw 1e-3, "
                   f"batch {BATCH}x{SEQ_LEN}",
          "steps": args.quality_steps, "rank": 64, "warm_previous": "exact basis `gap` steps earlier",
          "summary": summary_q, "per_matrix": rows},
      "timing": None if timings is None else {
          "preset": args.preset, "layers": args.layers, "exact_layers": args.exact_layers, "rank": args.rank,
          "alpha": alpha, "kernel_shapes": common.layer_kernels(llama.preset(args.preset)),
          "gradients": "synthetic: Gaussian factors, power-law spectrum i^-alpha on 1024 directions + 1e-4 noise",
          "results": timings},
      "training": train,
      "final": final_figures(args, timings or {}, summary_q),
  }


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  state = {"rows": [], "summary_q": {}, "alpha": args.alpha, "timings": None, "train": None}
  provenance = common.provenance(__spec__.name, argv)
  write = lambda: common.write_json(args.out, record(args, provenance, **state))
  train_rows, val_rows = (None, None) if args.skip_quality and args.skip_train else byte_rows(args.max_bytes)
  if not args.skip_quality:
    start = time.perf_counter()
    state["rows"], loss = quality(args.model, train_rows, args.quality_steps, gap=min(50, args.quality_steps // 2),
                                  rank=64, fast=args.fast)
    state["summary_q"] = quality_summary(state["rows"], args.fast)
    print(f"quality ({args.model} real gradients, {len(state['rows'])} matrices, loss {loss:.3f}, "
          f"{time.perf_counter() - start:.0f}s):", json.dumps(state["summary_q"]), flush=True)
    write()
  if not args.alpha and state["rows"]:
    state["alpha"] = float(np.median([r["spectrum_alpha"] for r in state["rows"]]))

  start = time.perf_counter()
  state["timings"] = timing(args, state["alpha"], lambda timings: (state.update(timings=timings), write()))
  print(f"timing ({args.layers} {args.preset} layers, exact on {args.exact_layers}, rank {args.rank}, alpha "
        f"{state['alpha']:.2f}, {time.perf_counter() - start:.0f}s):", json.dumps(state["timings"]), flush=True)
  if not args.skip_train:
    state["train"] = train_compare(args.model, train_rows, val_rows, args.train_steps, rank=64, gap=50,
                                   refreshes={name: TRAIN_REFRESHES[name] for name in args.train_refreshes})
    write()
  result = record(args, provenance, **state)
  print(json.dumps(result["final"]))
  return result


if __name__ == "__main__":
  main()
