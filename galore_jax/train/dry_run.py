"""Will it fit? A run's train-step memory from its config, analytically in seconds or from XLA's compile.

Nothing is allocated and no data or tokenizer is read: parameters and optimizer state are
``ShapeDtypeStruct`` s. The analytic report (weights, gradients alive at once, the optimizer state
split into its parts, activations) takes seconds even for Llama-7B; with ``compile=True`` the real
train step is also compiled on abstract shapes and XLA's buffer assignment gives the peak (minutes at
7B on a CPU). On a GPU a compiled dry run also runs one real step to read the allocator's peak.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from galore_jax.optim.introspect import state_breakdown, tree_bytes
from galore_jax.train import config, layerwise, steps

GB = 1e9
LIMITS = (
    "XLA's CPU buffer assignment is not the GPU's: XLA:CPU computes bf16 matmuls in fp32 from fp32 copies of their "
    "operands, which inflates temporaries (4 bf16 layers of 4096x11008: temp 1.00 GB vs 0.60 GB in fp32; Llama-7B: "
    "the whole-tree GaLore step holds an fp32 copy of every projected gradient across the refresh, 25.9 GB, and "
    "with scanned layers the stacked bf16 weights are converted to fp32 once outside the loops, 25.9 GB). A GPU "
    "verdict comes from this dry run compiled for the GPU (no allocation; on a machine without one, "
    "bench/memory.py --compile_for h100) and from device_peak_gb of a real step."
)


def gradient_bytes(cfg, params) -> int:
  """Gradient bytes alive at once: a full set, or with layerwise updates the largest group's (a layer's, the
  head's, which is updated before the sweep, or the embedding's, updated after it)."""
  if not cfg.train.layerwise:
    return tree_bytes(params)
  layers, head, rest = layerwise.split_groups(params)
  if cfg.model.scan_layers:  # stacked [L, ...]: one layer is 1/L of them
    layer = tree_bytes(layers) // layerwise.layers_of(params, stacked=True).n
  else:
    layer = max(tree_bytes(p) for p in layers.values())
  return max(layer, tree_bytes(head), tree_bytes(rest))


def abstract_batch(cfg) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype)
  return {"inputs": spec(jnp.int32), "targets": spec(jnp.int32), "loss_mask": spec(jnp.float32),
          "segment_ids": spec(jnp.int32), "positions": spec(jnp.int32)}


def activation_estimate(cfg, model_cfg) -> int:
  """Bytes of activations kept for the backward pass (a rough analytic figure).

  Whole-tree step (micro-batches run one after another): with remat each block keeps its input
  (b·S·D) and the block being differentiated is recomputed, which holds its ~ (10·D + 3·F)·b·S values
  once; without remat every block keeps those values. Attention probabilities (b·H·S², fp32) are
  counted for one block. The fp32 logits and their gradient (2·b·S·V·4 bytes) come on top.
  Layerwise updates run the forward pass of every micro-batch first: every layer's input is kept for
  the whole batch (L·B·S·D), with the cotangents into and out of the current layer (2·B·S·D), and one
  block is recomputed at a time for one micro-batch (remat changes nothing there).
  """
  batch, b = cfg.train.batch_size, cfg.train.batch_size // cfg.train.grad_accum
  s, d, f, v = cfg.data.seq_len, model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.vocab_size
  item = jnp.dtype(model_cfg.dtype).itemsize
  block = b * s * (10 * d + 3 * f) * item + b * model_cfg.num_attention_heads * s * s * 4
  logits = 2 * b * s * v * 4
  if cfg.train.layerwise:
    return (model_cfg.num_hidden_layers + 2) * batch * s * d * item + block + logits
  kept = model_cfg.num_hidden_layers * (b * s * d * item if model_cfg.remat else block)
  return kept + (block if model_cfg.remat else 0) + logits


def analytic(cfg, params=None, opt_state=None) -> dict[str, Any]:
  """The analytic parts of the report (nothing compiled): weights, gradients alive, state breakdown, activations.

  ``params`` and ``opt_state`` (abstract) are built from ``cfg`` unless given.
  """
  model_cfg = config.model_config(cfg)
  if params is None:
    params = steps.params_of(config.abstract_model(cfg))
  if opt_state is None:
    opt_state = jax.eval_shape(config.build_optimizer(cfg).init, params)
  weights, state, grads = tree_bytes(params), tree_bytes(opt_state), gradient_bytes(cfg, params)
  activations = activation_estimate(cfg, model_cfg)
  low_rank = cfg.optimizer.name in config.LOW_RANK
  return {
      "preset": cfg.model.preset, "optimizer": cfg.optimizer.name,
      "rank": config.optimizer_options(cfg.optimizer)["rank"] if low_rank else None,
      "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
      "tokens_per_micro_batch": cfg.train.batch_size // cfg.train.grad_accum * cfg.data.seq_len,
      "param_dtype": str(model_cfg.param_dtype), "remat": model_cfg.remat,
      "params": steps.count_params(params),
      "layerwise": bool(cfg.train.layerwise),
      "weights_gb": weights / GB, "gradients_gb": grads / GB, "optimizer_state_gb": state / GB,
      **{f"{k}_gb": v / GB for k, v in state_breakdown(opt_state).items()},
      "activations_estimate_gb": activations / GB,
      "analytic_total_gb": (weights + grads + state + activations) / GB,
  }


def sequences_that_fit(cfg, budget_gb: float) -> int:
  """The most sequences per step, in one micro-batch, whose analytic total stays within ``budget_gb`` (0 if none).

  Without layerwise updates this is also the most sequences per micro-batch with any accumulation;
  with them every micro-batch's layer inputs are kept, so accumulating does not raise it."""
  one = cfg.copy_and_resolve_references()
  one.train.batch_size, one.train.grad_accum = 1, 1
  fixed = analytic(one)
  per_sequence = fixed["activations_estimate_gb"]
  free = budget_gb - (fixed["analytic_total_gb"] - per_sequence)
  return max(0, int(free // per_sequence))


def dry_run(cfg, *, compile: bool = True, real_step: bool | None = None, device=None) -> dict[str, Any]:
  """The memory report of ``cfg``'s train step: analytic, and with ``compile`` also XLA's figures of the compiled
  step; ``real_step`` (default: on GPU, when compiled) also runs one step. ``device`` (default: the first local
  one) is the device compiled for: a compile-only device of another platform (``bench/gpu_target.py``) gives that
  platform's buffer assignment without the hardware, and no real step."""
  abstract = config.abstract_model(cfg)
  params = steps.params_of(abstract)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  args = (params, opt_state, abstract_batch(cfg))
  if device is None:
    device = jax.devices()[0]
  else:
    placed = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed), args)
  report = {**analytic(cfg, params, opt_state), "backend": device.platform, "device": device.device_kind}
  if not compile:
    return report
  step_fns = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=cfg.train.grad_accum, packed=cfg.data.packing,
                              report_overlap=config.reports_overlap(cfg), layerwise_updates=cfg.train.layerwise,
                              skip_nonfinite=cfg.train.nonfinite == "skip")
  start = time.perf_counter()
  compiled = step_fns.train.lower(*args).compile()
  report["compile_s"] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is not None:
    arg, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    report.update(xla_argument_gb=arg / GB, xla_output_gb=out / GB, xla_alias_gb=alias / GB, xla_temp_gb=temp / GB,
                  xla_peak_gb=(arg + out - alias + temp) / GB)
  if device not in jax.devices():
    return report  # a compile-only device: nothing here can run the step
  if real_step if real_step is not None else jax.default_backend() == "gpu":
    in_use_before, peak = _one_real_step(cfg, compiled, tx)
    report.update(device_in_use_before_step_gb=in_use_before / GB, device_peak_gb=peak / GB)
  return report


def _one_real_step(cfg, compiled, tx) -> tuple[int, int]:
  """Bytes in use on the device before one real step on random weights and tokens (the weights and the
  optimizer state), and the peak bytes in use after it. The peak counts from the process's start, so the first
  figure shows whether it could be the initialisation's rather than the step's."""
  model = config.build_model(cfg, cfg.seed)
  params = steps.params_of(model)
  del model
  opt_state = jax.jit(tx.init)(params)
  rng = np.random.default_rng(0)
  vocab = config.model_config(cfg).vocab_size
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = {"inputs": rng.integers(0, vocab, shape, dtype=np.int32),
           "targets": rng.integers(0, vocab, shape, dtype=np.int32),
           "loss_mask": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
           "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}
  jax.block_until_ready((params, opt_state))
  in_use_before = _memory_stats().get("bytes_in_use", 0)
  params, opt_state, metrics = compiled(params, opt_state, batch)  # the step compiled above, not a second compile
  jax.block_until_ready(metrics)
  return in_use_before, _memory_stats().get("peak_bytes_in_use", 0)


def _memory_stats() -> dict[str, int]:
  """The first device's allocator statistics (empty where the backend keeps none, as on CPU)."""
  return jax.devices()[0].memory_stats() or {}


def format_report(report: dict[str, Any]) -> str:
  rows = [("weights", "weights_gb"), ("gradients alive at once", "gradients_gb"),
          ("optimizer state", "optimizer_state_gb"), ("  low-rank moments", "moments_low_rank_gb"),
          ("  projector bases", "projector_bases_gb"), ("  full-rank states", "full_rank_states_gb"),
          ("  update-rule states (limiter norms)", "rule_states_gb"),
          ("activations (estimate)", "activations_estimate_gb"), ("analytic total", "analytic_total_gb"),
          ("XLA arguments", "xla_argument_gb"), ("XLA outputs", "xla_output_gb"), ("XLA aliased", "xla_alias_gb"),
          ("XLA temporaries", "xla_temp_gb"), ("XLA peak (args+out-alias+temp)", "xla_peak_gb"),
          ("device in use before the real step", "device_in_use_before_step_gb"),
          ("device peak, one real step", "device_peak_gb")]
  lines = [f"{report['preset']} · {report['optimizer']}" + (f" r={report['rank']}" if report["rank"] else "") +
           f" · {report['tokens_per_step']} tokens/step ({report['tokens_per_micro_batch']} per micro-batch) · "
           f"{report['param_dtype']} · remat={report['remat']} · layerwise={report['layerwise']} · "
           f"{report['backend']} ({report['device']}) · " +
           (f"compiled in {report['compile_s']:.1f}s" if "compile_s" in report else
            "analytic (--dry_run_compile adds XLA's figures of the compiled step)")]
  width = max(len(label) for label, _ in rows)
  lines += [f"  {label:<{width}}{report[key]:>10.2f} GB" for label, key in rows if report.get(key) is not None]
  if "xla_peak_gb" in report:
    lines.append(f"  note: {LIMITS}")
  return "\n".join(lines)
