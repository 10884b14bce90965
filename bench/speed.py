"""Training-step speed, side by side in one process: optax.adamw, optax.contrib.galore, galore_adamw (and
galore-torch's GaLoreAdamW on transformers' PyTorch Llama with --torch).

  python bench/speed.py [--preset llama_20m] [--tokens 4096] [--seq_len 256] [--steps 10] [--torch]

Every optimizer trains the same model (bf16 or fp32, --dtype) on the same random tokens with the real
jitted train step of galore_jax.training. galore_adamw runs with fp32 bases and moments (the library's
default) and with bf16 ones (configs/llama*.py, and what galore-torch keeps for a bf16 model). The first step
after init refreshes the bases (count 0) and also pays every one-time cost of a first run (solver handles,
workspaces, lazily loaded kernels): it is reported as `first_step_s`. The timed non-refresh steps follow;
then the step counter is set to T (galore-torch: each projected parameter's `step`) so that one more step
refreshes, warm: `refresh_s`, what every T-th step of a training run costs. `amortized_s` =
(refresh + (T-1)·non-refresh) / T with T = update_proj_gap.
GaLore settings are the paper's for the preset (rank, T = 200, scale 0.25) and target exactly the
attention and MLP matrices for both GaLore implementations. Writes a JSON results file.

--scan_layers stacks the layers' kernels (``[L, in, out]``, run by ``lax.scan``): galore_adamw then projects each
stack with one batched matmul per kernel type instead of one per layer. optax.contrib.galore cannot project
stacked kernels (it refuses batch axes), so it is left out there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from galore_jax import galore_adamw  # noqa: E402
from galore_jax.train import metrics, steps as training  # noqa: E402
from galore_jax.models import llama  # noqa: E402
from galore_jax.optim.plan import DEFAULT_TARGET, path_str  # noqa: E402
from step_time import set_count  # noqa: E402

RANKS = {"llama_9m": 32, "llama_20m": 64, "llama_35m": 128, "llama_60m": 128, "llama_130m": 256,
         "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}
LR, SCALE, GAP = 0.01, 0.25, 200


def attn_mlp_dims(params):
  """optax.contrib.galore's weight_dimension_numbers restricted to the attn/mlp kernels (None = not projected)."""
  import re

  from optax.contrib import GaLoreDimensionNumbers

  return jax.tree_util.tree_map_with_path(
      lambda p, x: GaLoreDimensionNumbers(0, 1) if x.ndim == 2 and re.search(DEFAULT_TARGET, path_str(p)) else None,
      params)


def optimizers(rank):
  return {
      "adamw": optax.adamw(LR, eps=1e-6),
      # configs/llama*.py's precision and galore-torch's in a bf16 model: bases and moments stored in bf16
      "galore_jax.galore_adamw(randomized) bf16 states": galore_adamw(
          LR, rank=rank, update_proj_gap=GAP, scale=SCALE, refresh="randomized", basis_dtype="bfloat16",
          moment_dtype="bfloat16"),
      # the previous basis plus 10 random columns as the test matrix, no power iteration: no LU in the sketch
      "galore_jax.galore_adamw(randomized_warm) bf16 states": galore_adamw(
          LR, rank=rank, update_proj_gap=GAP, scale=SCALE, refresh="randomized_warm", basis_dtype="bfloat16",
          moment_dtype="bfloat16"),
      "galore_jax.galore_adamw(randomized)": galore_adamw(LR, rank=rank, update_proj_gap=GAP, scale=SCALE,
                                                          refresh="randomized"),
      "optax.contrib.galore": optax.contrib.galore(LR, rank=rank, update_proj_gap=GAP, scale=SCALE,
                                                   weight_dimension_numbers=attn_mlp_dims),
      "galore_jax.galore_adamw": galore_adamw(LR, rank=rank, update_proj_gap=GAP, scale=SCALE),
  }


def random_batch(batch, seq_len, vocab, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, seq_len)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(shape, np.float32),
          "segment_ids": np.ones(shape, np.int32), "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                                                 shape).copy()}


def time_jax(model_cfg, tx, batch, steps):
  """(compile_s, first step, warm refresh step, non-refresh step times, final loss) of the real train step.

  Compiled ahead of time. The first step after init (count 0) and the step run with the counter set to T
  refresh every basis for both GaLore implementations and do nothing special for AdamW.
  """
  model = llama.Llama(model_cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), training.params_of(model)
  del model
  step = training.make_steps(graphdef, tx, grad_accum=1, packed=False, report_overlap=False).train
  state = jax.jit(tx.init)(params)
  start = time.perf_counter()
  compiled = step.lower(params, state, batch).compile()
  compile_s = time.perf_counter() - start

  def timed_step(params, state):
    start = time.perf_counter()
    params, state, m = compiled(params, state, batch)
    jax.block_until_ready(m)
    return params, state, m, time.perf_counter() - start

  params, state, m, first = timed_step(params, state)
  times = []
  for _ in range(steps):
    params, state, m, seconds = timed_step(params, state)
    times.append(seconds)
  params, state, m, refresh = timed_step(params, set_count(state, GAP))
  return compile_s, first, refresh, times, float(m["loss"])


def _import_galore_torch():
  """galore_torch's package __init__ imports bitsandbytes (for its 8-bit class only); stub it when absent."""
  try:
    import bitsandbytes  # noqa: F401
  except ImportError:
    import types

    stub = types.ModuleType("bitsandbytes.optim.optimizer")
    stub.Optimizer2State = object
    for name in ("bitsandbytes", "bitsandbytes.optim"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["bitsandbytes.optim.optimizer"] = stub
  from galore_torch import GaLoreAdamW

  return GaLoreAdamW


def time_torch(model_cfg, rank, batch, steps):
  """galore-torch's GaLoreAdamW on transformers' LlamaForCausalLM (sdpa attention), the reference script's grouping.

  One forward/backward without an optimizer step warms CUDA up; the first optimizer step then refreshes
  every projector (galore-torch refreshes when its per-parameter step % gap == 0).
  """
  import warnings

  import torch
  import transformers

  GaLoreAdamW = _import_galore_torch()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  dtype = torch.bfloat16 if str(model_cfg.param_dtype) == "bfloat16" else torch.float32
  config = transformers.LlamaConfig(
      vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
      intermediate_size=model_cfg.intermediate_size, num_hidden_layers=model_cfg.num_hidden_layers,
      num_attention_heads=model_cfg.num_attention_heads, max_position_embeddings=model_cfg.max_position_embeddings,
      rms_norm_eps=model_cfg.rms_norm_eps)
  model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
  galore = [p for n, p in model.named_parameters() if p.ndim == 2 and ("attn" in n or "mlp" in n)]
  ids = {id(p) for p in galore}
  regular = [p for p in model.parameters() if id(p) not in ids]
  groups = [{"params": regular}, {"params": galore, "rank": rank, "update_proj_gap": GAP, "scale": SCALE,
                                  "proj_type": "std"}]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = GaLoreAdamW(groups, lr=LR)
  inputs = torch.tensor(batch["inputs"], dtype=torch.long, device=device)
  targets = torch.tensor(batch["targets"], dtype=torch.long, device=device)

  def forward_backward():
    logits = model(inputs).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    return loss

  def step():
    loss = forward_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())  # synchronizes

  def timed_step():
    start = time.perf_counter()
    loss = step()
    sync()
    return loss, time.perf_counter() - start

  forward_backward()
  model.zero_grad(set_to_none=True)
  sync()
  _, first = timed_step()
  times = [timed_step()[1] for _ in range(steps)]
  for p in galore:  # GaLoreProjector refreshes when the parameter's step % update_proj_gap == 0
    opt.state[p]["step"] = GAP
  loss, refresh = timed_step()
  return 0.0, first, refresh, times, loss


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="llama_20m")
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per optimizer step")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed non-refresh steps")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--torch", action="store_true", help="also time galore-torch (needs torch + galore-torch)")
  parser.add_argument("--scan_layers", action="store_true",
                      help="stack the layers and run them with lax.scan (galore-torch keeps its own loop)")
  parser.add_argument("--only", default=None, help="comma-separated subset of the JAX optimizers to time")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  model_cfg = llama.preset(args.preset, param_dtype=args.dtype, dtype=args.dtype,
                           max_position_embeddings=max(args.seq_len, 256), scan_layers=args.scan_layers)
  rank = RANKS[args.preset]
  batch = random_batch(args.tokens // args.seq_len, args.seq_len, model_cfg.vocab_size)
  device = jax.devices()[0]
  n_params = llama.count_params(model_cfg) if hasattr(llama, "count_params") else None
  flops = training.flops_per_token(model_cfg, n_params, args.seq_len) if n_params else None
  peak = metrics.peak_flops(device)

  results = {}
  chosen = optimizers(rank)
  if args.only:
    chosen = {name: tx for name, tx in chosen.items() if name in args.only.split(",")}
  if args.scan_layers:
    chosen.pop("optax.contrib.galore", None)
  runs = [(name, lambda tx=tx: time_jax(model_cfg, tx, batch, args.steps)) for name, tx in chosen.items()]
  if args.torch:
    runs.insert(min(2, len(runs)), ("galore-torch GaLoreAdamW", lambda: time_torch(model_cfg, rank, batch, args.steps)))
  import flax

  record = {
      "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
      "backend": jax.default_backend(), "device": device.device_kind, "cpu_count": os.cpu_count(),
      "versions": {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
                   "python": platform.python_version()},
      "preset": args.preset, "scan_layers": args.scan_layers, "params": n_params, "dtype": args.dtype,
      "tokens_per_step": args.tokens, "seq_len": args.seq_len, "rank": rank, "update_proj_gap": GAP,
      "timed_steps": args.steps, "peak_flops": peak, "results": results,
  }
  if args.torch:
    import torch

    record["versions"]["torch"] = torch.__version__
  scan = "-scan" if args.scan_layers else ""
  out = args.out or f"bench/results/speed-{jax.default_backend()}-{args.preset}-{args.tokens}{scan}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  for name, timed in runs:  # the results file is rewritten after each run: a time limit keeps what finished
    compile_s, first, refresh, times, loss = timed()
    non_refresh = statistics.median(times)
    amortized = (refresh + (GAP - 1) * non_refresh) / GAP
    results[name] = {"compile_s": compile_s, "first_step_s": first, "refresh_s": refresh,
                     "non_refresh_s": non_refresh,
                     "non_refresh_spread_s": [min(times), max(times)], "amortized_s": amortized,
                     "tokens_per_sec": args.tokens / amortized, "final_loss": loss}
    if flops and peak:
      results[name]["mfu"] = flops * args.tokens / amortized / peak
    print(f"{name:<26} first {first:8.3f}s  refresh {refresh:8.3f}s  step {non_refresh:8.4f}s  "
          f"amortized(T={GAP}) {amortized:8.4f}s  {args.tokens / amortized:10.0f} tok/s", flush=True)
    add_ratios(results)
    with open(out, "w") as f:
      json.dump(record, f, indent=1)
  print(json.dumps({name: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                    for name, r in results.items()}))


def add_ratios(results):
  if "adamw" in results:
    base = results["adamw"]
    for r in results.values():
      r["amortized_ratio_to_adamw"] = r["amortized_s"] / base["amortized_s"]
      r["non_refresh_ratio_to_adamw"] = r["non_refresh_s"] / base["non_refresh_s"]
  if "galore-torch GaLoreAdamW" in results:
    torch_tps = results["galore-torch GaLoreAdamW"]["tokens_per_sec"]
    for r in results.values():
      r["tokens_per_sec_ratio_to_galore_torch"] = r["tokens_per_sec"] / torch_tps


if __name__ == "__main__":
  main()
