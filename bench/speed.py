"""Training-step speed, side by side in one process: optax.adamw, optax.contrib.galore, galore_adamw (and
galore-torch's GaLoreAdamW on transformers' PyTorch Llama with --torch).

  python -m bench.speed [--preset llama_20m] [--tokens 4096] [--seq_len 256] [--steps 10] [--torch]
                        [--dtype float32|bfloat16] [--scan_layers] [--only a,b] [--out PATH]

Every optimizer trains the same model (bf16 or fp32, --dtype) on the same random tokens with the real
jitted train step of galore_jax.train.steps. galore_adamw runs with fp32 bases and moments (the library's
default) and with bf16 ones (configs/llama*.py, and what galore-torch keeps for a bf16 model). The first step
after init refreshes the bases (count 0) and also pays every one-time cost of a first run (solver handles,
workspaces, lazily loaded kernels): it is reported as `first_step_s`. The timed non-refresh steps follow;
then the step counter is set to T (galore-torch: each projected parameter's `step`) so that one more step
refreshes, warm: `refresh_s`, what every T-th step of a training run costs. `amortized_s` =
(refresh + (T-1)·non-refresh) / T with T = update_proj_gap.
GaLore settings are the preset's paper settings (rank, T, scale, lr: bench/common.py, from configs/llama*.py)
and target exactly the attention and MLP matrices for both GaLore implementations. The results file is
rewritten after each optimizer: a time limit keeps what finished.

--scan_layers stacks the layers' kernels (``[L, in, out]``, run by ``lax.scan``): galore_adamw then projects each
stack with one batched matmul per kernel type instead of one per layer. optax.contrib.galore cannot project
stacked kernels (it refuses batch axes), so it is left out there.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import optax
from flax import nnx

from bench import common
from galore_jax import galore_adamw
from galore_jax.models import llama
from galore_jax.train import metrics, steps

TORCH = "galore-torch GaLoreAdamW"


def optimizers(settings: dict) -> dict[str, optax.GradientTransformation]:
  """The JAX optimizers by name (no name holds a comma: --only's separator)."""
  lr, galore = settings["lr"], {k: settings[k] for k in ("rank", "update_proj_gap", "scale")}
  bf16 = dict(basis_dtype="bfloat16", moment_dtype="bfloat16")
  return {
      "adamw": optax.adamw(lr, eps=1e-6),
      # configs/llama*.py's precision and galore-torch's in a bf16 model: bases and moments stored in bf16
      "galore_jax.galore_adamw(randomized) bf16 states": galore_adamw(lr, **galore, refresh="randomized", **bf16),
      # the previous basis plus 10 random columns as the test matrix, no power iteration: no LU in the sketch
      "galore_jax.galore_adamw(randomized_warm) bf16 states": galore_adamw(lr, **galore, refresh="randomized_warm",
                                                                           **bf16),
      "galore_jax.galore_adamw(randomized)": galore_adamw(lr, **galore, refresh="randomized"),
      "optax.contrib.galore": optax.contrib.galore(
          lr, **galore, weight_dimension_numbers=common.attn_mlp_dimension_numbers),
      "galore_jax.galore_adamw": galore_adamw(lr, **galore),
  }


def time_jax(model_cfg, tx, batch, n_steps: int, gap: int):
  """(compile_s, first step, warm refresh step, non-refresh step times, final loss) of the real train step.

  Compiled ahead of time. The first step after init (count 0) and the step run with the counter set to T
  refresh every basis for both GaLore implementations and do nothing special for AdamW.
  """
  model = llama.Llama(model_cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  del model
  step = steps.make_steps(graphdef, tx, grad_accum=1, packed=False, report_overlap=False).train
  state = jax.jit(tx.init)(params)
  compiled, compile_s = common.seconds(lambda: step.lower(params, state, batch).compile())
  (params, state, m), first = common.seconds(compiled, params, state, batch)
  times = []
  for _ in range(n_steps):
    (params, state, m), seconds = common.seconds(compiled, params, state, batch)
    times.append(seconds)
  (params, state, m), refresh = common.seconds(compiled, params, common.set_count(state, gap), batch)
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


def time_torch(model_cfg, settings: dict, batch, n_steps: int):
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
  gap = settings["update_proj_gap"]
  groups = [{"params": regular}, {"params": galore, "rank": settings["rank"], "update_proj_gap": gap,
                                  "scale": settings["scale"], "proj_type": "std"}]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = GaLoreAdamW(groups, lr=settings["lr"])
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
  times = [timed_step()[1] for _ in range(n_steps)]
  for p in galore:  # GaLoreProjector refreshes when the parameter's step % update_proj_gap == 0
    opt.state[p]["step"] = gap
  loss, refresh = timed_step()
  return 0.0, first, refresh, times, loss


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_20m", choices=common.PRESETS)
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per optimizer step")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10, help="timed non-refresh steps")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--torch", action="store_true", help="also time galore-torch (needs torch + galore-torch)")
  ap.add_argument("--scan_layers", action="store_true",
                  help="stack the layers and run them with lax.scan (galore-torch keeps its own loop)")
  ap.add_argument("--only", default=None, help="comma-separated subset of the JAX optimizers to time: " +
                  ", ".join(optimizers(common.paper_settings("llama_9m"))))
  ap.add_argument("--out", default=None, help="default bench/results/speed-<backend>-<preset>-<tokens>[-scan].json")
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  args.settings = common.paper_settings(args.preset)
  known = optimizers(args.settings)
  args.only = common.choose(args.only, known, "optimizer") if args.only else list(known)
  if args.scan_layers:
    args.only = [name for name in args.only if name != "optax.contrib.galore"]
  if args.tokens % args.seq_len or args.tokens <= 0:
    common.fail(f"--tokens {args.tokens} is not a positive multiple of --seq_len {args.seq_len}")
  scan = "-scan" if args.scan_layers else ""
  args.out = args.out or os.path.join(common.RESULTS,
                                      f"speed-{jax.default_backend()}-{args.preset}-{args.tokens}{scan}.json")
  return args


def figures(tokens: int, gap: int, timed, flops: float | None, peak: float | None) -> dict:
  """One optimizer's entry from ``(compile_s, first, refresh, non-refresh times, loss)``."""
  compile_s, first, refresh, times, loss = timed
  non_refresh = statistics.median(times)
  amortized = (refresh + (gap - 1) * non_refresh) / gap
  entry = {"compile_s": compile_s, "first_step_s": first, "refresh_s": refresh, "non_refresh_s": non_refresh,
           "non_refresh_spread_s": [min(times), max(times)], "amortized_s": amortized,
           "tokens_per_sec": tokens / amortized, "final_loss": loss}
  if flops and peak:
    entry["mfu"] = flops * tokens / amortized / peak
  return entry


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  settings, gap = args.settings, args.settings["update_proj_gap"]
  model_cfg = llama.preset(args.preset, param_dtype=args.dtype, dtype=args.dtype,
                           max_position_embeddings=max(args.seq_len, 256), scan_layers=args.scan_layers)
  batch = common.random_batch(args.tokens // args.seq_len, args.seq_len, model_cfg.vocab_size)
  n_params = llama.count_params(model_cfg)
  flops = steps.flops_per_token(model_cfg, n_params, args.seq_len)
  peak = metrics.peak_flops(jax.devices()[0])
  chosen = optimizers(settings)
  runs = [(name, lambda tx=chosen[name]: time_jax(model_cfg, tx, batch, args.steps, gap)) for name in args.only]
  if args.torch:
    runs.insert(min(2, len(runs)), (TORCH, lambda: time_torch(model_cfg, settings, batch, args.steps)))
    import torch  # noqa: F401 - imported before the provenance is taken, which then records its version
  results = {}
  record = {**common.provenance(__spec__.name, argv), "preset": args.preset, "scan_layers": args.scan_layers,
            "params": n_params, "dtype": args.dtype,
            "tokens_per_step": args.tokens, "seq_len": args.seq_len, "rank": settings["rank"],
            "update_proj_gap": gap, "scale": settings["scale"], "learning_rate": settings["lr"],
            "timed_steps": args.steps, "peak_flops": peak, "results": results}
  for name, timed in runs:  # the results file is rewritten after each run: a time limit keeps what finished
    results[name] = r = figures(args.tokens, gap, timed(), flops, peak)
    print(f"{name:<26} first {r['first_step_s']:8.3f}s  refresh {r['refresh_s']:8.3f}s  step "
          f"{r['non_refresh_s']:8.4f}s  amortized(T={gap}) {r['amortized_s']:8.4f}s  {r['tokens_per_sec']:10.0f} tok/s",
          flush=True)
    add_ratios(results)
    common.write_json(args.out, record)
  print(json.dumps({name: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                    for name, r in results.items()}))
  return record


def add_ratios(results):
  if "adamw" in results:
    base = results["adamw"]
    for r in results.values():
      r["amortized_ratio_to_adamw"] = r["amortized_s"] / base["amortized_s"]
      r["non_refresh_ratio_to_adamw"] = r["non_refresh_s"] / base["non_refresh_s"]
  if TORCH in results:
    torch_tps = results[TORCH]["tokens_per_sec"]
    for r in results.values():
      r["tokens_per_sec_ratio_to_galore_torch"] = r["tokens_per_sec"] / torch_tps


if __name__ == "__main__":
  main()
