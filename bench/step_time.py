"""Optimizer step time, side by side in one process: optax.adamw, optax.contrib.galore, galore_jax's optimizers.

  python -m bench.step_time [--preset llama_350m] [--layers N] [--dtype float32|bfloat16] [--repeats 20]
                            [--refresh_repeats 3] [--only NAME ...] [--out PATH]

Only the optimizer is timed: `tx.update` + `optax.apply_updates` on a fixed tree of random gradients (fp32, or
bf16 params and gradients with --dtype bfloat16)
with the parameter shapes of a GaLore-paper Llama (galore_jax.models.llama's preset, Flax layout (in, out),
paths like `layers/0/attn/q_proj/kernel`); there is no model forward/backward. Each optimizer gets its own copy of the
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

GaLore settings are the paper's (rank, T, scale and lr of the preset's configs/llama*.py, bench/common.py:
e.g. rank 256, T = 200, scale 0.25, lr 0.01 for 350M; weight decay 0 everywhere); galore_adamw runs with fp32
bases and moments and, as configs/llama*.py, with bf16 ones. Both GaLore implementations project exactly the
attn/mlp kernels:
galore_jax by its default target, optax.contrib.galore through `weight_dimension_numbers` (None for every
other leaf), so embed/lm_head/norms get plain full-rank Adam in both. Note the two choose different sides
for a non-square kernel: galore_jax follows galore-torch's 'std' rule (project the smaller dimension, low-rank
state (r, larger)), optax.contrib projects the larger one (state (smaller, r)), hence different state bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bench import common
from galore_jax import apollo_adamw, apollo_mini, fira_adamw, galore_adamw, golore_adamw, q_galore_adamw
from galore_jax.models import llama
from galore_jax.train import steps

NOTES = [
    "The machine's CPU cores were shared with other processes (e.g. test runs) during the measurement; "
    "absolute times carry that noise. Ratios to adamw, measured side by side in interleaved rounds, "
    "are the meaningful numbers.",
    "optax.contrib.galore projects the larger dimension of a non-square kernel (state (smaller, r)), "
    "galore_jax the smaller one as galore-torch's 'std' does (state (r, larger)): different state "
    "bytes and projection cost.",
    "adamw has no refresh: its refresh_s is more of its ordinary steps, timed in the refresh rounds.",
]


def random_params(model_cfg: llama.LlamaConfig, seed: int, scale: float, dtype) -> dict:
  """The model's parameter tree (shapes of galore_jax.models.llama) filled with ``scale``·N(0, 1) in ``dtype``."""
  abstract = steps.params_of(nnx.eval_shape(lambda: llama.Llama(model_cfg, rngs=nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(abstract)
  key = jax.random.key(seed)
  return jax.tree.unflatten(treedef, [(scale * jax.random.normal(jax.random.fold_in(key, i), x.shape)).astype(dtype)
                                      for i, x in enumerate(leaves)])


def optimizers(settings: dict) -> dict[str, optax.GradientTransformation]:
  """The optimizers by name (names hold no comma)."""
  lr, galore = settings["lr"], {k: settings[k] for k in ("rank", "update_proj_gap", "scale")}
  return {
      "adamw": optax.adamw(lr, eps=1e-6, weight_decay=0.0),
      "optax.contrib.galore": optax.contrib.galore(lr, **galore,
                                                   weight_dimension_numbers=common.attn_mlp_dimension_numbers),
      "galore_jax.galore_adamw": galore_adamw(lr, **galore),
      # configs/llama*.py's precision, the reference's pure-bf16 run: bases and moments stored in bf16
      "galore_jax.galore_adamw bf16 states": galore_adamw(lr, **galore, basis_dtype=jnp.bfloat16,
                                                          moment_dtype=jnp.bfloat16),
      # the low-rank family at the same rank and gap, each with its own defaults otherwise (fp32 states)
      "galore_jax.fira_adamw": fira_adamw(lr, **galore),
      "galore_jax.apollo_adamw": apollo_adamw(lr, rank=galore["rank"], update_proj_gap=galore["update_proj_gap"]),
      "galore_jax.apollo_mini": apollo_mini(lr, update_proj_gap=galore["update_proj_gap"]),
      "galore_jax.golore_adamw": golore_adamw(lr, **galore, switch_step=0),
      "galore_jax.q_galore_adamw": q_galore_adamw(lr, **galore, adaptive_gap=None),  # int4 bases; T fixed to time it
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


class Runner:

  def __init__(self, name, tx, model_cfg, grads):
    self.name, self.tx, self.grads = name, tx, grads
    self.loads: list[float] = []  # 1-min load average after each step (other processes' noise)
    self.params = random_params(model_cfg, seed=0, scale=0.02, dtype=jax.tree.leaves(grads)[0].dtype)
    self.state = jax.block_until_ready(jax.jit(tx.init)(self.params))
    self.state_bytes = common.tree_bytes(self.state)
    self.state_leaves = len(jax.tree.leaves(self.state))

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads)
    self.compiled, self.compile_s = common.seconds(lowered.compile)
    self.figures = compiled_figures(self.compiled)

  def step(self, count: int) -> float:
    state = jax.block_until_ready(common.set_count(self.state, count))
    (self.params, self.state), elapsed = common.seconds(self.compiled, self.params, state, self.grads)
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


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_350m", choices=common.PRESETS)
  ap.add_argument("--layers", type=int, default=None, help="truncate the layer count (quick runs)")
  ap.add_argument("--repeats", type=int, default=20, help="timed non-refresh steps per optimizer")
  ap.add_argument("--refresh_repeats", type=int, default=3, help="timed refresh steps per optimizer")
  ap.add_argument("--warmup", type=int, default=3, help="untimed non-refresh steps per optimizer")
  ap.add_argument("--refresh_warmup", type=int, default=0,
                  help="untimed refresh steps per optimizer (the refresh branch is already compiled)")
  ap.add_argument("--rank", type=int, default=None, help="override the preset's paper rank")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params and gradients")
  ap.add_argument("--only", nargs="*", default=None, help="subset of optimizers (adamw is always kept): " +
                  ", ".join(optimizers(common.paper_settings("llama_9m"))))
  ap.add_argument("--out", default=None, help="default bench/results/step_time-<platform>-<preset>[-<N>layers].json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.settings = common.paper_settings(args.preset) | ({"rank": args.rank} if args.rank else {})
  known = optimizers(args.settings)
  args.only = ["adamw"] + [n for n in common.choose(args.only or list(known), known, "optimizer") if n != "adamw"]
  preset_layers = llama.PRESETS[args.preset].num_hidden_layers
  args.layers = preset_layers if args.layers is None else args.layers
  if not 1 <= args.layers <= preset_layers:
    common.fail(f"--layers {args.layers} is not within 1..{preset_layers} ({args.preset})")
  suffix = (f"-{args.layers}layers" if args.layers != preset_layers else "") + ("-bf16" if args.dtype == "bfloat16"
                                                                                 else "")
  args.out = args.out or os.path.join(common.RESULTS, f"step_time-{jax.default_backend()}-{args.preset}{suffix}.json")
  return args


def measure(args, runners) -> dict:
  """Interleaved rounds of non-refresh then refresh steps; per optimizer the medians, spreads and ratios."""
  gap = args.settings["update_proj_gap"]
  non_refresh_count = lambda i: 1 + i % (gap - 1)
  refresh_count = lambda i: gap * (i + 1)
  rounds(runners, args.warmup, non_refresh_count)
  non_refresh = rounds(runners, args.repeats, lambda i: non_refresh_count(args.warmup + i))
  non_refresh_loads = {r.name: r.loads for r in runners}
  rounds(runners, args.refresh_warmup, refresh_count, log="refresh warmup")
  refresh = rounds(runners, args.refresh_repeats, lambda i: refresh_count(args.refresh_warmup + i), log="refresh")
  refresh_loads = {r.name: r.loads for r in runners}
  results = {}
  for r in runners:  # --refresh_repeats 0 times the non-refresh steps alone (refresh figures None)
    ref = common.summary(refresh[r.name]) | {"loadavg_1min": refresh_loads[r.name]} if refresh[r.name] else None
    non = common.summary(non_refresh[r.name]) | {"loadavg_1min": non_refresh_loads[r.name]}
    results[r.name] = {
        "refresh_s": ref and ref["median"], "non_refresh_s": non["median"],
        "amortized_s": ref and (ref["median"] + (gap - 1) * non["median"]) / gap,
        "amortized_from_min_s": ref and (ref["min"] + (gap - 1) * non["min"]) / gap,
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
  return results


def print_table(results: dict) -> None:
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


def method(args) -> dict:
  return {
      "timed": f"tx.update + optax.apply_updates on fixed random {args.dtype} gradients (no model), jitted, "
               "params/state donated, AOT-compiled (compile excluded), block_until_ready",
      "refresh_steps": f"forced: state[0].count set to a multiple of T before each timed call (real "
                       f"T={args.settings['update_proj_gap']})",
      "non_refresh_steps": "state[0].count set to 1 + (i mod (T-1))",
      "interleaving": "round-robin, one step per optimizer per round, order rotated each round",
      "warmup": args.warmup, "repeats": args.repeats,
      "refresh_warmup": args.refresh_warmup, "refresh_repeats": args.refresh_repeats,
      "amortized": "(refresh_s + (T-1) * non_refresh_s) / T with medians; amortized_from_min_s the same "
                   "with the fastest samples (less sensitive to other processes on a shared CPU)",
      "loadavg_1min": "os.getloadavg()[0] after each timed step, in *_stats_s (machine load incl. this run)",
  }


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  warnings.filterwarnings("ignore", message=".*donated.*")
  model_cfg = llama.preset(args.preset, num_hidden_layers=args.layers)
  preset_layers, settings = llama.PRESETS[args.preset].num_hidden_layers, args.settings
  grads = random_params(model_cfg, seed=1, scale=1e-3, dtype=jnp.dtype(args.dtype))
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(grads))
  print(f"{args.preset}: {args.layers}/{preset_layers} layers, {n_params / 1e6:.1f}M params, rank {settings['rank']}, "
        f"T {settings['update_proj_gap']}, device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs", flush=True)
  txs = optimizers(settings)
  runners = []
  for name in args.only:
    runners.append(r := Runner(name, txs[name], model_cfg, grads))
    print(f"  {name:<24} compiled in {r.compile_s:7.2f}s, state {r.state_bytes / 2**20:9.1f} MiB", flush=True)
  results = measure(args, runners)
  print_table(results)
  truncated = args.layers != preset_layers
  record = {
      **common.provenance(__spec__.name, argv), "preset": args.preset,
      "shapes": {"vocab": model_cfg.vocab_size, "hidden": model_cfg.hidden_size,
                 "intermediate": model_cfg.intermediate_size, "heads": model_cfg.num_attention_heads,
                 "layers": args.layers, "preset_layers": preset_layers, "layers_truncated": truncated},
      "params": n_params, "param_bytes": jnp.dtype(args.dtype).itemsize * n_params, "dtype": args.dtype,
      "settings": {"rank": settings["rank"], "update_proj_gap": settings["update_proj_gap"],
                   "scale": settings["scale"], "learning_rate": settings["lr"], "weight_decay": 0.0,
                   "proj_type": "std", "refresh": "exact SVD (both GaLore implementations)",
                   "target": "2-D kernels whose path matches 'attn|mlp' (both GaLore implementations)"},
      "method": method(args),
      "notes": NOTES + ([f"Truncated to {args.layers} of the preset's {preset_layers} layers (--layers)."]
                        if truncated else [])
               + ([f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}: the LAPACK SVDs of the refresh ran "
                   "with that many OpenBLAS threads."] if os.environ.get("OPENBLAS_NUM_THREADS") else []),
      "results": results,
  }
  print(f"wrote {common.write_json(args.out, record)}")
  print(json.dumps({"preset": args.preset, "layers": args.layers, "results": {
      name: {k: round(r[k], 5) if isinstance(r[k], float) else r[k]
             for k in ("refresh_s", "non_refresh_s", "amortized_s", "ratio_to_adamw", "state_bytes")}
      for name, r in results.items()}}))
  return record


if __name__ == "__main__":
  main()
