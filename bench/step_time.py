"""Optimizer step time, side by side in one process: optax.adamw, optax.contrib.galore, galore_jax.galore_adamw.

  python bench/step_time.py [--preset llama_350m] [--layers N] [--dtype float32|bfloat16] [--repeats 20]
                            [--refresh_repeats 3] [--out PATH]

Only the optimizer is timed: `tx.update` + `optax.apply_updates` on a fixed tree of random gradients (fp32, or
bf16 params and gradients with --dtype bfloat16)
with the kernel shapes of a GaLore-paper Llama (Flax layout (in, out), paths like
`layers/0/attn/q_proj/kernel`); there is no model forward/backward. Each optimizer gets its own copy of the
parameters and one jitted step `(params, state, grads) -> (params, state)` with params and state donated,
compiled ahead of time (`jit(...).lower(...).compile()`, compile time reported separately, never in the
step times). Every timed call ends with `jax.block_until_ready` on the new params and state.

Refresh vs non-refresh steps: before every timed call the step counter at the head of the optimizer's chain
state (`state[0].count`: galore_jax's `GaLoreState.count`, optax.contrib's `GaLoreState.count`, and for
adamw `ScaleByAdamState.count`, which only feeds the bias correction) is set to
  - a multiple of T (T, 2T, ...) for a *refresh* step: both GaLore implementations then run their SVD branch
    of `lax.cond` (`count % update_proj_gap == 0`), with the real gap T = 200 (no `update_proj_gap=1` variant);
  - 1 + (i mod (T - 1)) for a *non-refresh* step i.
Setting the counter is outside the timed region. adamw has no refresh: its "refresh" numbers are simply
more of its ordinary steps, timed in the same rounds. Steps are interleaved round-robin (one step of each
optimizer per round, the order rotated every round) so that load from other processes hits all of them
alike; the ratios to adamw are therefore the meaningful numbers on a shared machine.

On CPU, jax's SVD is LAPACK gesdd from scipy's OpenBLAS, whose threads spin-wait: when other processes
hold the cores, a multi-threaded refresh can slow down many-fold (seen here: > 10 min for one 24-layer refresh
that takes ~55 s on an idle machine). On a shared machine run with OPENBLAS_NUM_THREADS=1 (recorded in the
results' `env`).

Reported per optimizer: median (and min/max/quartiles, all samples) of the refresh and non-refresh steps,
`amortized_s = (refresh + (T - 1) * non_refresh) / T`, `ratio_to_adamw` (of the amortized times, plus the
refresh and non-refresh ratios), the optimizer state's bytes (sum of `nbytes` over the state's leaves), and
XLA's figures for the compiled step (`compiled`: temporaries, bytes accessed, and the copies in the main
program, which every step pays).

GaLore settings are the paper's (rank per preset, e.g. 256 for 350M; T = 200; scale 0.25; lr 0.01; weight
decay 0 everywhere); galore_adamw runs with fp32 bases and moments and, as configs/llama*.py, with bf16 ones. Both GaLore implementations project exactly the attn/mlp kernels:
galore_jax by its default target, optax.contrib.galore through `weight_dimension_numbers` (None for every
other leaf), so embed/lm_head/norms get plain full-rank Adam in both. Note the two choose different sides
for a non-square kernel: galore_jax follows galore-torch's 'std' rule (project the smaller dimension, low-rank
state (r, larger)), optax.contrib projects the larger one (state (smaller, r)), hence different state bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import galore_jax  # noqa: E402

# name: (hidden, intermediate, heads, layers, GaLore rank from the paper); vocab 32000 for all.
PRESETS = {
    "llama_60m": (512, 1376, 8, 8, 128),
    "llama_130m": (768, 2048, 12, 12, 256),
    "llama_350m": (1024, 2736, 16, 24, 256),
    "llama_1b": (2048, 5461, 32, 24, 512),
}
VOCAB = 32000
LR, SCALE, GAP = 0.01, 0.25, 200
TARGET = r"attn|mlp"  # = galore_jax.transform.DEFAULT_TARGET


def shapes(preset: str, layers: int | None) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape, Flax layout."""
  hidden, inter, _, n_layers, _ = PRESETS[preset]
  n_layers = n_layers if layers is None else layers
  out = {"embed/embedding": (VOCAB, hidden)}
  for i in range(n_layers):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out[f"layers/{i}/attn/{name}/kernel"] = (hidden, hidden)
    out[f"layers/{i}/mlp/gate_proj/kernel"] = (hidden, inter)
    out[f"layers/{i}/mlp/up_proj/kernel"] = (hidden, inter)
    out[f"layers/{i}/mlp/down_proj/kernel"] = (inter, hidden)
    out[f"layers/{i}/input_norm/scale"] = (hidden,)
    out[f"layers/{i}/post_attention_norm/scale"] = (hidden,)
  out["final_norm/scale"] = (hidden,)
  out["lm_head/kernel"] = (hidden, VOCAB)
  return out


def nest(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *heads, last = path.split("/")
    for h in heads:
      node = node.setdefault(h, {})
    node[last] = value
  return tree


def random_tree(table: dict[str, tuple[int, ...]], seed: int, scale: float, dtype=jnp.float32) -> dict:
  key = jax.random.key(seed)
  flat = {}
  for i, (path, shape) in enumerate(table.items()):
    flat[path] = (scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
  return nest(flat)


def contrib_dims(params):
  """optax.contrib.galore's weight_dimension_numbers: project the 2-D attn/mlp kernels only."""
  from optax.contrib import GaLoreDimensionNumbers

  return jax.tree_util.tree_map_with_path(
      lambda p, x: GaLoreDimensionNumbers(0, 1)
      if x.ndim == 2 and re.search(TARGET, galore_jax.optim.plan.path_str(p)) else None, params)


def optimizers(rank: int) -> dict[str, optax.GradientTransformation]:
  return {
      "adamw": optax.adamw(LR, eps=1e-6, weight_decay=0.0),
      "optax.contrib.galore": optax.contrib.galore(LR, rank=rank, update_proj_gap=GAP, scale=SCALE,
                                                   weight_dimension_numbers=contrib_dims),
      "galore_jax.galore_adamw": galore_jax.galore_adamw(LR, rank=rank, update_proj_gap=GAP, scale=SCALE),
      # configs/llama*.py's precision, the reference's pure-bf16 run: bases and moments stored in bf16
      "galore_jax.galore_adamw bf16 states": galore_jax.galore_adamw(
          LR, rank=rank, update_proj_gap=GAP, scale=SCALE, basis_dtype=jnp.bfloat16, moment_dtype=jnp.bfloat16),
  }


def compiled_figures(compiled) -> dict:
  """XLA's own figures for the compiled step: temporaries, bytes accessed, and the copies of the main program.

  Copies in the entry computation run on every step (those inside the refresh branch only when it is taken):
  an optimizer that forces XLA to copy its state pays for it on every non-refresh step.
  """
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
  copies = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} copy\(", entry)
  copy_bytes = sum(itemsize.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in copies)
  return {"temp_bytes": memory.temp_size_in_bytes, "entry_copies": len(copies), "entry_copy_bytes": copy_bytes,
          "bytes_accessed_all_branches": cost.get("bytes accessed"), "flops_all_branches": cost.get("flops")}


def set_count(state, count: int):
  """The chain's first state with its step counter replaced (a fresh int32 scalar)."""
  head = state[0]
  if not hasattr(head, "count"):
    raise TypeError(f"no step counter at the head of the chain state: {type(head).__name__}")
  return (head._replace(count=jnp.asarray(count, jnp.int32)), *state[1:])


def tree_bytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def summary(samples: list[float]) -> dict:
  q = np.percentile(samples, [25, 75]).tolist() if samples else [None, None]
  return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
          "p25": q[0], "p75": q[1], "n": len(samples), "samples": samples}


class Runner:

  def __init__(self, name, tx, table, grads):
    self.name, self.tx, self.grads = name, tx, grads
    self.loads: list[float] = []  # 1-min load average after each step (other processes' noise)
    self.params = random_tree(table, seed=0, scale=0.02, dtype=jax.tree.leaves(grads)[0].dtype)
    self.state = jax.jit(tx.init)(self.params)
    jax.block_until_ready(self.state)
    self.state_bytes = tree_bytes(self.state)
    self.state_leaves = len(jax.tree.leaves(self.state))

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads).compile()
    self.compile_s = time.perf_counter() - start
    self.figures = compiled_figures(self.compiled)

  def step(self, count: int) -> float:
    state = set_count(self.state, count)
    jax.block_until_ready(state)
    start = time.perf_counter()
    self.params, self.state = self.compiled(self.params, state, self.grads)
    jax.block_until_ready((self.params, self.state))
    elapsed = time.perf_counter() - start
    self.loads.append(os.getloadavg()[0])
    return elapsed


def rounds(runners, n, count_of, log=None):
  times = {r.name: [] for r in runners}
  for r in runners:
    r.loads = []
  for i in range(n):
    k = i % len(runners)
    for r in runners[k:] + runners[:k]:
      t = r.step(count_of(i))
      times[r.name].append(t)
      if log:
        print(f"  {log} {i + 1}/{n} {r.name:<24} {t:9.4f}s", flush=True)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="llama_350m", choices=sorted(PRESETS))
  parser.add_argument("--layers", type=int, default=None, help="truncate the layer count (quick runs)")
  parser.add_argument("--repeats", type=int, default=20, help="timed non-refresh steps per optimizer")
  parser.add_argument("--refresh_repeats", type=int, default=3, help="timed refresh steps per optimizer")
  parser.add_argument("--warmup", type=int, default=3, help="untimed non-refresh steps per optimizer")
  parser.add_argument("--refresh_warmup", type=int, default=0,
                      help="untimed refresh steps per optimizer (the refresh branch is already compiled)")
  parser.add_argument("--rank", type=int, default=None, help="override the preset's paper rank")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params and gradients")
  parser.add_argument("--only", nargs="*", default=None, help="subset of optimizers (adamw is always kept)")
  parser.add_argument("--out", default=None,
                      help="default bench/results/step_time-<platform>-<preset>[-<N>layers].json")
  args = parser.parse_args()
  warnings.filterwarnings("ignore", message=".*donated.*")

  hidden, inter, heads, n_layers, paper_rank = PRESETS[args.preset]
  layers = n_layers if args.layers is None else args.layers
  rank = args.rank or paper_rank
  table = shapes(args.preset, layers)
  n_params = sum(int(np.prod(s)) for s in table.values())
  device = jax.devices()[0]
  print(f"{args.preset}: {layers}/{n_layers} layers, {n_params / 1e6:.1f}M params, rank {rank}, T {GAP}, "
        f"device {device.platform}/{device.device_kind}, {os.cpu_count()} CPUs", flush=True)

  grads = random_tree(table, seed=1, scale=1e-3, dtype=jnp.dtype(args.dtype))
  txs = optimizers(rank)
  if args.only:
    txs = {k: v for k, v in txs.items() if k == "adamw" or k in args.only}
  runners = []
  for name, tx in txs.items():
    runners.append(Runner(name, tx, table, grads))
    r = runners[-1]
    print(f"  {name:<24} compiled in {r.compile_s:7.2f}s, state {r.state_bytes / 2**20:9.1f} MiB", flush=True)

  non_refresh_count = lambda i: 1 + i % (GAP - 1)
  refresh_count = lambda i: GAP * (i + 1)
  rounds(runners, args.warmup, non_refresh_count)
  non_refresh = rounds(runners, args.repeats, lambda i: non_refresh_count(args.warmup + i))
  non_refresh_loads = {r.name: r.loads for r in runners}
  rounds(runners, args.refresh_warmup, refresh_count, log="refresh warmup")
  refresh = rounds(runners, args.refresh_repeats, lambda i: refresh_count(args.refresh_warmup + i), log="refresh")
  refresh_loads = {r.name: r.loads for r in runners}

  results = {}
  for r in runners:  # --refresh_repeats 0 times the non-refresh steps alone (refresh figures None)
    ref = summary(refresh[r.name]) if refresh[r.name] else None
    non = summary(non_refresh[r.name])
    non["loadavg_1min"] = non_refresh_loads[r.name]
    if ref:
      ref["loadavg_1min"] = refresh_loads[r.name]
    results[r.name] = {
        "refresh_s": ref and ref["median"], "non_refresh_s": non["median"],
        "amortized_s": ref and (ref["median"] + (GAP - 1) * non["median"]) / GAP,
        "amortized_from_min_s": ref and (ref["min"] + (GAP - 1) * non["min"]) / GAP,
        "refresh_stats_s": ref, "non_refresh_stats_s": non,
        "compile_s": r.compile_s, "state_bytes": r.state_bytes, "state_leaves": r.state_leaves,
        "compiled": r.figures,
    }
  base = results["adamw"]
  ratio = lambda key, r: r[key] / base[key] if r[key] is not None else None
  for r in results.values():
    r["ratio_to_adamw"] = ratio("amortized_s", r)
    r["refresh_ratio_to_adamw"] = ratio("refresh_s", r)
    r["non_refresh_ratio_to_adamw"] = ratio("non_refresh_s", r)
    r["state_bytes_ratio_to_adamw"] = ratio("state_bytes", r)
    r["ratio_to_adamw_from_min"] = ratio("amortized_from_min_s", r)

  header = (f"{'optimizer':<24} {'refresh s':>10} {'non-refr s':>10} {'amort s':>9} {'x adamw':>8} "
            f"{'refr x':>8} {'non x':>7} {'state MiB':>10} {'compile s':>9} {'copies MiB':>10} {'temp MiB':>9}")
  print(header)
  print("-" * len(header))
  cell = lambda x, spec: format(x, spec) if x is not None else format("-", spec[:spec.index(".")] + "s")
  for name, r in results.items():
    print(f"{name:<24} {cell(r['refresh_s'], '10.4f')} {r['non_refresh_s']:10.4f} {cell(r['amortized_s'], '9.4f')} "
          f"{cell(r['ratio_to_adamw'], '8.3f')} {cell(r['refresh_ratio_to_adamw'], '8.1f')} "
          f"{r['non_refresh_ratio_to_adamw']:7.3f} {r['state_bytes'] / 2**20:10.1f} {r['compile_s']:9.1f} "
          f"{r['compiled']['entry_copy_bytes'] / 2**20:10.1f} {r['compiled']['temp_bytes'] / 2**20:9.1f}")

  import flax

  truncated = layers != n_layers
  record = {
      "backend": device.platform,
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join(["python"] + sys.argv),
      "device": {"platform": device.platform, "device_kind": device.device_kind, "count": jax.device_count()},
      "cpu_count": os.cpu_count(),
      "versions": {"jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
                   "optax": optax.__version__, "flax": flax.__version__, "python": platform.python_version(),
                   "galore_jax": galore_jax.__version__},
      "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
      "preset": args.preset,
      "shapes": {"vocab": VOCAB, "hidden": hidden, "intermediate": inter, "heads": heads,
                 "layers": layers, "preset_layers": n_layers, "layers_truncated": truncated},
      "params": n_params, "param_bytes": jnp.dtype(args.dtype).itemsize * n_params, "dtype": args.dtype,
      "settings": {"rank": rank, "update_proj_gap": GAP, "scale": SCALE, "learning_rate": LR, "weight_decay": 0.0,
                   "proj_type": "std", "refresh": "exact SVD (both GaLore implementations)",
                   "target": "2-D kernels whose path matches 'attn|mlp' (both GaLore implementations)"},
      "method": {
          "timed": f"tx.update + optax.apply_updates on fixed random {args.dtype} gradients (no model), jitted, "
                   "params/state donated, AOT-compiled (compile excluded), block_until_ready",
          "refresh_steps": "forced: state[0].count set to a multiple of T before each timed call (real T=200)",
          "non_refresh_steps": "state[0].count set to 1 + (i mod (T-1))",
          "interleaving": "round-robin, one step per optimizer per round, order rotated each round",
          "warmup": args.warmup, "repeats": args.repeats,
          "refresh_warmup": args.refresh_warmup, "refresh_repeats": args.refresh_repeats,
          "amortized": "(refresh_s + (T-1) * non_refresh_s) / T with medians; amortized_from_min_s the same "
                       "with the fastest samples (less sensitive to other processes on a shared CPU)",
          "loadavg_1min": "os.getloadavg()[0] after each timed step, in *_stats_s (machine load incl. this run)",
      },
      "notes": [
          "The machine's CPU cores were shared with other processes (e.g. test runs) during the measurement; "
          "absolute times carry that noise. Ratios to adamw, measured side by side in interleaved rounds, "
          "are the meaningful numbers.",
          "optax.contrib.galore projects the larger dimension of a non-square kernel (state (smaller, r)), "
          "galore_jax the smaller one as galore-torch's 'std' does (state (r, larger)): different state "
          "bytes and projection cost.",
          "adamw has no refresh: its refresh_s is more of its ordinary steps, timed in the refresh rounds.",
      ] + ([f"Truncated to {layers} of the preset's {n_layers} layers (--layers)."] if truncated else [])
        + ([f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}: the LAPACK SVDs of the refresh ran with "
            "that many OpenBLAS threads."] if os.environ.get("OPENBLAS_NUM_THREADS") else []),
      "results": results,
  }
  suffix = (f"-{layers}layers" if truncated else "") + ("-bf16" if args.dtype == "bfloat16" else "")
  out = args.out or f"bench/results/step_time-{device.platform}-{args.preset}{suffix}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {out}")
  print(json.dumps({"preset": args.preset, "layers": layers, "results": {
      name: {k: round(r[k], 5) if isinstance(r[k], float) else r[k]
             for k in ("refresh_s", "non_refresh_s", "amortized_s", "ratio_to_adamw", "state_bytes")}
      for name, r in results.items()}}))


if __name__ == "__main__":
  main()
