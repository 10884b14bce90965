"""Fast subspace refresh: quality on real Llama gradients, time on llama_1b shapes, and a short training run.

  python bench/refresh.py [--preset llama_1b|llama_7b] [--layers 1] [--exact_layers N] [--rank R]
                          [--exact_algorithms jacobi,qr] [--skip_quality] [--skip_train]

1. quality: a byte-level (vocab 256) llama_20m trained with optax.adamw on the Python standard library's
   source files; the gradients of its attention/MLP kernels at step N (and N - gap, as the previous basis of
   the warm start) are refreshed exactly and fast at rank 64; per matrix: energy captured by the fast basis
   over that of the exact top-r basis, and the subspace overlap (mean squared cosine of principal angles).
2. time: one refresh of all kernels of `--layers` llama_1b (or llama_7b) layers (Flax layout: q,k,v,o
   2048x2048, gate,up 2048x5461, down 5461x2048; std sides) at rank 512 (7b: 4096/11008, rank 1024),
   measured on a jitted update that returns only the new state (XLA drops the projections), best of
   --repeats; the exact SVD on --exact_layers of them, scaled to the same layer count. The gradients are synthetic:
   Gaussian factors with a power-law spectrum s_i = i^-alpha (alpha from --alpha), energy ratios are
   measured on them. Full model = 24 (1b) or 32 (7b) layers: scaled per layer, flagged as extrapolated.
3. train: galore_adamw (rank 64, gap 50) on the byte-level llama_20m, exact vs fast refresh, same data
   and seed; eval loss on held-out text.

Prints a final JSON line {exact_s, fast_s, speedup, min_energy_ratio, ...} and writes
bench/results/refresh-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from galore_jax import ExactRefresh, RandomizedRefresh, galore, galore_adamw, plan_leaves  # noqa: E402
from galore_jax.optim import basis as projection, refresh as refresh_lib  # noqa: E402
from galore_jax.train import steps as training  # noqa: E402
from galore_jax.models import llama  # noqa: E402

FAST = {  # all: oversampling 10
    "randomized": RandomizedRefresh(),  # the default: q = 1, LU-stabilised
    "randomized(q=0)": RandomizedRefresh(iterations=0),
    "randomized(q=2)": RandomizedRefresh(iterations=2),
    "randomized(q=1,qr)": RandomizedRefresh(iterations=1, stabilizer="qr"),
    "randomized_warm": RandomizedRefresh(iterations=0, warm_start=True),  # refresh="randomized_warm"
    "warm(q=1)": RandomizedRefresh(iterations=1, warm_start=True),
    # the default with its finish (k x k eigh) run one matrix at a time instead of batched per shape group
    "randomized(finish unbatched)": RandomizedRefresh(batch_budget_bytes=0),
    "randomized(jacobi eigh)": RandomizedRefresh(eigh_algorithm="jacobi"),
}


# ----------------------------------------------------------------------------- data


def stdlib_bytes(limit: int = 8_000_000) -> np.ndarray:
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
  chunks, total = [], 0
  for f in files:
    try:
      b = open(f, "rb").read()
    except OSError:
      continue
    chunks.append(np.frombuffer(b, np.uint8))
    total += len(b)
    if total >= limit:
      break
  return np.concatenate(chunks).astype(np.int32)


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq - 1, batch)
    x = np.stack([data[s:s + seq + 1] for s in starts])
    yield {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones_like(x[:, 1:])}


def small_model(seed=0):
  cfg = llama.preset("llama_20m", vocab_size=256, max_position_embeddings=256)
  return nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(seed)))


def make_train(graphdef, tx):
  def loss_fn(params, batch):
    loss, tokens = training.loss_and_tokens(nnx.merge(graphdef, params), batch, packed=False)
    return loss / tokens

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  return step, jax.jit(loss_fn)


# ----------------------------------------------------------------------------- 1. quality on real gradients


def quality(data, steps: int, gap: int, rank: int):
  graphdef, params = small_model()
  params = training.params_of(nnx.merge(graphdef, params))
  tx = optax.adamw(1e-3)
  step, _ = make_train(graphdef, tx)
  opt = tx.init(params)
  it = batches(data, 16, 128, seed=0)
  grads_at = {}
  for t in range(steps + 1):
    params, opt, loss, grads = step(params, opt, next(it))
    if t in (steps - gap, steps):
      grads_at[t] = grads
  _, plans, _ = plan_leaves(params, rank=rank)
  leaves = {t: jax.tree.leaves(g) for t, g in grads_at.items()}
  rows = []
  for j, p in enumerate(plans):
    if p is None:
      continue
    g_prev, g = (jnp.asarray(leaves[t][j], jnp.float32) for t in (steps - gap, steps))
    exact = refresh_lib.svd_basis(g, p.rank, p.sides)
    prev = refresh_lib.svd_basis(g_prev, p.rank, p.sides)
    e_exact = float(projection.captured_energy(g, exact))
    s = np.asarray(jnp.linalg.svd(g, compute_uv=False))
    row = {"path": p.path, "shape": [p.m, p.n], "rank": p.rank, "exact_energy": e_exact,
           "spectrum_alpha": float(-np.polyfit(np.log(np.arange(1, len(s) + 1)), np.log(s + 1e-30), 1)[0]),
           "previous_basis_energy_ratio": float(projection.captured_energy(g, prev)) / e_exact}
    for name, fn in FAST.items():
      b = fn(g, prev, p.rank, key=jax.random.fold_in(jax.random.key(0), j), warm=True)
      row[name] = {"energy_ratio": float(projection.captured_energy(g, b)) / e_exact,
                   "overlap": float(projection.subspace_overlap(b, exact))}
    rows.append(row)
  return rows, float(loss)


# ----------------------------------------------------------------------------- 2. time on llama_1b shapes


def synthetic(key, m, n, alpha, d=1024):
  """Gaussian factors with a power-law spectrum on the first `d` directions (and a small noise floor)."""
  k1, k2, k3 = jax.random.split(key, 3)
  s = jnp.arange(1, d + 1, dtype=jnp.float32) ** -alpha
  a = jax.random.normal(k1, (m, d)) / np.sqrt(m)
  b = jax.random.normal(k2, (d, n)) / np.sqrt(n)
  return (a * s) @ b + 1e-4 * jax.random.normal(k3, (m, n)) / np.sqrt(n)


KERNEL_SHAPES = {  # Flax layout (input, output) of one layer's attention and MLP kernels
    "llama_1b": {"attn/q_proj": (2048, 2048), "attn/k_proj": (2048, 2048), "attn/v_proj": (2048, 2048),
                 "attn/o_proj": (2048, 2048), "mlp/gate_proj": (2048, 5461), "mlp/up_proj": (2048, 5461),
                 "mlp/down_proj": (5461, 2048)},
    "llama_7b": {"attn/q_proj": (4096, 4096), "attn/k_proj": (4096, 4096), "attn/v_proj": (4096, 4096),
                 "attn/o_proj": (4096, 4096), "mlp/gate_proj": (4096, 11008), "mlp/up_proj": (4096, 11008),
                 "mlp/down_proj": (11008, 4096)},
}
LAYERS = {"llama_1b": 24, "llama_7b": 32}


def kernel_grads(preset: str, layers: int, alpha: float):
  tree, i = {}, 0
  for layer in range(layers):
    for name, shape in KERNEL_SHAPES[preset].items():
      mod, proj = name.split("/")
      tree.setdefault(f"layers_{layer}", {}).setdefault(mod, {})[proj] = {
          "kernel": synthetic(jax.random.key(i), *shape, alpha)}
      i += 1
  return tree


def time_refresh(grads, rank, refresh, batch_refresh=False, repeats=2):
  """Seconds of one refresh of every leaf of `grads` (best of `repeats`, compiled and warm), and the bases.

  Only the new optimizer state is returned from the jitted update, so XLA drops the projections: what runs
  is the refresh branch (count = gap: a refresh with a previous basis, so warm starts are warm).
  """
  tx = galore(optax.identity(), rank=rank, update_proj_gap=10, refresh=refresh, batch_refresh=batch_refresh)
  new_state = jax.jit(lambda g, s: tx.update(g, s)[1])
  fresh = jax.block_until_ready(new_state(grads, tx.init(grads)))  # step 0: the bases the warm start uses
  on = fresh._replace(count=jnp.int32(10))
  out = jax.block_until_ready(new_state(grads, on))
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(new_state(grads, on))
    best = min(best, time.perf_counter() - t)
  return best, out.bases


def first_layers(grads, n):
  return {k: v for k, v in grads.items() if int(k.split("_")[1]) < n}


def timing(preset, layers, exact_layers, rank, alpha, repeats, exact_algorithms=(), fast=tuple(FAST)):
  """Exact SVD on `exact_layers` layers (scaled to `layers`), fast refreshes on all `layers`."""
  grads = kernel_grads(preset, layers, alpha)
  small = first_layers(grads, exact_layers)
  scale = layers / exact_layers
  results = {}
  exact_s, exact_bases = time_refresh(small, rank, "svd", repeats=repeats)
  results["svd"] = {"refresh_s": exact_s * scale, "measured_layers": exact_layers}
  for algorithm in exact_algorithms:
    s, _ = time_refresh(small, rank, ExactRefresh(svd_algorithm=algorithm), repeats=repeats)
    results[f"svd({algorithm})"] = {"refresh_s": s * scale, "measured_layers": exact_layers,
                                    "speedup": exact_s / s}
  _, plans, _ = plan_leaves(small, target=".*", rank=rank)
  mats = dict(zip([p.path for p in plans], jax.tree.leaves(small)))
  e_exact = {p.path: float(projection.captured_energy(mats[p.path], exact_bases[p.path])) for p in plans}
  for name in fast:
    s, bases = time_refresh(grads, rank, FAST[name], repeats=repeats)
    ratios = {p.path: float(projection.captured_energy(mats[p.path], bases[p.path])) / e_exact[p.path] for p in plans}
    results[name] = {"refresh_s": s, "measured_layers": layers, "speedup": exact_s * scale / s,
                     "min_energy_ratio": min(ratios.values()), "exact_energy_min": min(e_exact.values())}
  if layers > 1:
    s, _ = time_refresh(grads, rank, FAST["randomized"], batch_refresh=True, repeats=repeats)
    results["randomized+batch_refresh"] = {"refresh_s": s, "measured_layers": layers, "speedup": exact_s * scale / s}
  return results


# ----------------------------------------------------------------------------- 3. training


def train_compare(data, eval_data, steps, rank, gap, refreshes):
  out = {}
  for name, refresh in refreshes.items():
    graphdef, state = small_model(seed=0)
    params = training.params_of(nnx.merge(graphdef, state))
    tx = galore_adamw(optax.warmup_cosine_decay_schedule(0.0, 0.01, steps // 10, steps, 0.001), rank=rank,
                      update_proj_gap=gap, scale=0.25, refresh=refresh)
    step, loss_fn = make_train(graphdef, tx)
    opt = tx.init(params)
    it = batches(data, 16, 128, seed=1)
    t0 = time.perf_counter()
    for _ in range(steps):
      params, opt, loss, _ = step(params, opt, next(it))
    ev = batches(eval_data, 16, 128, seed=2)
    eval_loss = float(np.mean([loss_fn(params, next(ev)) for _ in range(20)]))
    out[name] = {"train_loss": float(loss), "eval_loss": eval_loss, "wall_s": time.perf_counter() - t0}
    print(f"train {name}: eval loss {eval_loss:.4f}", flush=True)
  base = out["svd"]["eval_loss"]
  for name in out:
    out[name]["eval_loss_rel_diff"] = out[name]["eval_loss"] / base - 1
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="llama_1b", choices=sorted(KERNEL_SHAPES), help="kernel shapes to time")
  ap.add_argument("--layers", type=int, default=1, help="layers to time the fast refreshes on (llama_1b has 24, "
                  "llama_7b 32); the full-model figures scale by layers_in_model / layers")
  ap.add_argument("--exact_layers", type=int, default=None, help="layers to time the exact SVD on (default --layers)")
  ap.add_argument("--rank", type=int, default=None, help="default: the paper's (512 for 1b, 1024 for 7b)")
  ap.add_argument("--exact_algorithms", default="", help="comma-separated extra svd_algorithm values to time")
  ap.add_argument("--fast", default=",".join(FAST), help="comma-separated fast refreshes to time: " + ", ".join(FAST))
  ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the synthetic spectrum "
                  "(0: the median fitted on the real llama_20m gradients, which is steep, ~3)")
  ap.add_argument("--quality_steps", type=int, default=200)
  ap.add_argument("--train_steps", type=int, default=300)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip_quality", action="store_true")
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  rank = args.rank or {"llama_1b": 512, "llama_7b": 1024}[args.preset]
  exact_layers = args.exact_layers or args.layers
  model_layers = LAYERS[args.preset]

  data = stdlib_bytes()
  split = int(len(data) * 0.95)
  train_data, eval_data = data[:split], data[split:]
  summary_q, rows = {}, []
  if not args.skip_quality:
    t = time.perf_counter()
    rows, loss = quality(train_data, args.quality_steps, gap=min(50, args.quality_steps // 2), rank=64)
    summary_q = {name: {"min_energy_ratio": min(r[name]["energy_ratio"] for r in rows),
                        "mean_energy_ratio": float(np.mean([r[name]["energy_ratio"] for r in rows])),
                        "min_overlap": min(r[name]["overlap"] for r in rows)} for name in FAST}
    print(f"quality (llama_20m real gradients, {len(rows)} matrices, loss {loss:.3f}, "
          f"{time.perf_counter() - t:.0f}s):", json.dumps(summary_q), flush=True)
  alpha = args.alpha if args.alpha or not rows else float(np.median([r["spectrum_alpha"] for r in rows]))

  t = time.perf_counter()
  algorithms = [a for a in args.exact_algorithms.split(",") if a]
  timings = timing(args.preset, args.layers, exact_layers, rank, alpha, args.repeats, algorithms,
                   fast=[f for f in args.fast.split(",") if f])
  print(f"timing ({args.layers} {args.preset} layers, exact on {exact_layers}, rank {rank}, alpha {alpha:.2f}, "
        f"{time.perf_counter() - t:.0f}s):", json.dumps(timings), flush=True)

  train = None
  if not args.skip_train:
    train = train_compare(train_data, eval_data, args.train_steps, rank=64, gap=50,
                          refreshes={"svd": "svd", "randomized": "randomized", "randomized_warm": "randomized_warm"})

  device = jax.devices()[0]
  fast_name = "randomized"
  per_model = model_layers / args.layers

  def quality_ok(n):
    return summary_q.get(n, {}).get("min_energy_ratio", 1.0) >= 0.99

  final = {
      "preset": args.preset, "rank": rank,
      "exact_s": timings["svd"]["refresh_s"],
      "fast_s": timings[fast_name]["refresh_s"],
      "fast": fast_name,
      "speedup": timings[fast_name]["speedup"],
      "min_energy_ratio": min([timings[fast_name]["min_energy_ratio"]] +
                              ([summary_q[fast_name]["min_energy_ratio"]] if summary_q else [])),
      "layers_timed": args.layers, "exact_layers_timed": exact_layers,
      "fastest_at_0.99": min((n for n in timings if timings[n].get("min_energy_ratio", 0) >= 0.99 and quality_ok(n)),
                             key=lambda n: timings[n]["refresh_s"], default=None),
      f"exact_s_{model_layers}_layers": timings["svd"]["refresh_s"] * per_model,
      f"fast_s_{model_layers}_layers": timings[fast_name]["refresh_s"] * per_model,
      "full_model_is_extrapolated": {"exact": exact_layers != model_layers, "fast": args.layers != model_layers},
  }
  if "randomized+batch_refresh" in timings:
    final[f"fast_batched_s_{model_layers}_layers"] = timings["randomized+batch_refresh"]["refresh_s"] * per_model
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": f"{device.platform}: {getattr(device, 'device_kind', '')}, {os.cpu_count()} cores, "
                f"{platform.processor() or platform.machine()}",
      "versions": {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
                   "python": platform.python_version()},
      "command": "python " + " ".join(sys.argv),
      "quality_real_gradients": None if args.skip_quality else {
          "model": "llama_20m, vocab 256 (bytes of stdlib .py files), adamw 1e-3, batch 16x128",
          "steps": args.quality_steps, "rank": 64, "warm_previous": "exact basis 50 steps earlier",
          "summary": summary_q, "per_matrix": rows},
      "timing": {"preset": args.preset, "layers": args.layers, "exact_layers": exact_layers, "rank": rank,
                 "alpha": alpha, "kernel_shapes": KERNEL_SHAPES[args.preset],
                 "gradients": "synthetic: Gaussian factors, power-law spectrum i^-alpha on 1024 directions + 1e-4 noise",
                 "results": timings},
      "training": train,
      "final": final,
  }
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"refresh-{device.platform}-{args.preset}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(final))


if __name__ == "__main__":
  main()
