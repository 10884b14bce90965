"""The pieces of a training run: config → model, schedule, optimizer, and the jitted steps.

Parameters travel as plain nested dicts (``nnx.State.to_pure_dict``), so optimizer states and
checkpoints have the model's paths (``layers/0/attn/q_proj/kernel``) and nothing NNX-specific.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax import layerwise, projection, sharding
from galore_jax.adafactor import galore_adafactor
from galore_jax.adam8bit import galore_adamw_8bit, scale_by_adam_8bit
from galore_jax.models import llama
from galore_jax.transform import REFRESH_METHODS, AdaptiveGap, GaLoreState, galore_adamw

OPTIMIZERS = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "adamw", "adamw_8bit")
MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


class ConfigError(ValueError):
  """A config value that cannot work; the message names it."""


def _positive(name: str, value) -> None:
  if value is None or value <= 0:
    raise ConfigError(f"{name} must be positive, got {value!r}")


def validate(cfg) -> None:
  """Check the values a run depends on before anything is built or written."""
  for name in ("train.batch_size", "train.grad_accum", "train.steps", "train.log_every", "train.lr", "data.seq_len",
               "eval.every", "eval.batches", "checkpoint.every", "checkpoint.keep"):
    section, key = name.split(".")
    _positive(name, cfg[section][key])
  if cfg.train.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps must be >= 0, got {cfg.train.warmup_steps}")
  if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
    raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by train.grad_accum "
                      f"{cfg.train.grad_accum}")
  if cfg.optimizer.name not in OPTIMIZERS:
    raise ConfigError(f"optimizer.name {cfg.optimizer.name!r} is not one of {OPTIMIZERS}")
  if cfg.optimizer.name.startswith("galore"):
    _positive("optimizer.rank", cfg.optimizer.rank)
    _positive("optimizer.update_proj_gap", cfg.optimizer.update_proj_gap)
    if cfg.optimizer.proj_type not in projection.PROJ_TYPES:
      raise ConfigError(f"optimizer.proj_type {cfg.optimizer.proj_type!r} is not one of {projection.PROJ_TYPES}")
    if cfg.optimizer.refresh not in REFRESH_METHODS:
      raise ConfigError(f"optimizer.refresh {cfg.optimizer.refresh!r} is not one of {tuple(REFRESH_METHODS)}")
  if cfg.optimizer.name.endswith("8bit") and cfg.optimizer.block_size not in (256, 2048):
    raise ConfigError(f"optimizer.block_size must be 256 or 2048, got {cfg.optimizer.block_size}")
  if cfg.train.layerwise and cfg.model.scan_layers:
    raise ConfigError("train.layerwise=True needs model.scan_layers=False (one parameter tree per layer)")
  _validate_mesh(cfg)
  model_cfg = model_config(cfg)
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                      f"{model_cfg.max_position_embeddings}")


def _validate_mesh(cfg) -> None:
  """The mesh fits the devices, and every micro-batch and eval batch splits over all of them."""
  if "mesh" not in cfg:
    return
  if cfg.mesh.axis_types not in sharding.AXIS_TYPES:
    raise ConfigError(f"mesh.axis_types must be one of {sharding.AXIS_TYPES}, got {cfg.mesh.axis_types!r}")
  try:
    data, fsdp = sharding.resolve_sizes(cfg.mesh.data, cfg.mesh.fsdp, jax.device_count())
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from None
  devices = data * fsdp
  if devices > 1 and cfg.train.layerwise:
    raise ConfigError(f"train.layerwise=True runs on one device, but mesh.data x mesh.fsdp = {devices}: "
                      "set --config.mesh.fsdp=1 --config.mesh.data=1 or train.layerwise=False")
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % devices:
    raise ConfigError(f"train.batch_size / train.grad_accum = {micro} sequences per micro-batch does not split over "
                      f"mesh.data x mesh.fsdp = {devices} devices")
  eval_size = cfg.eval.batch_size or micro
  if eval_size % devices:
    raise ConfigError(f"eval.batch_size {eval_size} does not split over mesh.data x mesh.fsdp = {devices} devices")


def model_config(cfg) -> llama.LlamaConfig:
  """The LlamaConfig of a run: an HF checkpoint's config or a preset, with the config's overrides."""
  overrides = {k: cfg.model[k] for k in MODEL_OVERRIDES if cfg.model.get(k) is not None}
  overrides.update(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
                   remat_policy=cfg.model.remat_policy, scan_layers=cfg.model.scan_layers)
  try:
    if cfg.model.hf_checkpoint:
      from galore_jax.models import hf
      with open(os.path.join(cfg.model.hf_checkpoint, "config.json")) as f:
        return hf.config_from_hf(json.load(f), **overrides)
    return llama.preset(cfg.model.preset, **overrides)
  except (ValueError, TypeError, OSError) as e:
    raise ConfigError(f"model: {e}") from None


def build_model(cfg, seed: int) -> llama.Llama:
  model_cfg = model_config(cfg)
  if cfg.model.hf_checkpoint:
    from galore_jax.models import hf
    overrides = {k: getattr(model_cfg, k) for k in ("remat", "remat_policy", "scan_layers")}
    return hf.from_hf(cfg.model.hf_checkpoint, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, **overrides)
  return llama.Llama(model_cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg) -> llama.Llama:
  """The model's structure with ShapeDtypeStruct leaves: nothing allocated."""
  model_cfg = model_config(cfg)
  return nnx.eval_shape(lambda: llama.Llama(model_cfg, rngs=nnx.Rngs(0)))


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """The reference's schedule: linear warmup from 0, then cosine down to ``min_lr_ratio·lr``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.lr,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.lr * train_cfg.min_lr_ratio,
  )


def _dtype_or_none(name):
  """Config dtypes: a name, or None / 'None' / '' for the default."""
  return None if name in (None, "", "None", "none") else name


def build_optimizer(cfg) -> optax.GradientTransformation:
  """The config's optimizer, with global-norm clipping in front when ``train.grad_clip > 0``.

  With ``train.layerwise`` a :class:`~galore_jax.layerwise.ByLayer`: one state per decoder layer.
  """
  o, schedule = cfg.optimizer, learning_rate_schedule(cfg.train)
  moment_dtype = _dtype_or_none(o.moment_dtype)
  galore_args = dict(rank=o.rank, update_proj_gap=o.update_proj_gap, scale=o.scale, proj_type=o.proj_type,
                     weight_decay=o.weight_decay, on_refresh=o.on_refresh, basis_dtype=o.basis_dtype,
                     refresh=o.refresh, refresh_seed=o.refresh_seed, stagger=o.stagger,
                     batch_refresh=o.batch_refresh, adaptive_gap=AdaptiveGap() if o.adaptive_gap else None)
  eight_bit = dict(block_size=o.block_size, min_8bit_size=o.min_8bit_size)
  if o.name == "galore_adamw":
    tx = galore_adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, moment_dtype=moment_dtype, **galore_args)
  elif o.name == "galore_adamw_8bit":
    tx = galore_adamw_8bit(schedule, b1=o.b1, b2=o.b2, eps=o.eps, **eight_bit, **galore_args)
  elif o.name == "galore_adafactor":
    tx = galore_adafactor(schedule, beta1=o.adafactor_beta1, **galore_args)
  elif o.name == "adamw_8bit":
    tx = optax.chain(scale_by_adam_8bit(o.b1, o.b2, o.eps, **eight_bit), optax.add_decayed_weights(o.weight_decay),
                     optax.scale_by_learning_rate(schedule))
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mu_dtype=moment_dtype)
  if cfg.train.layerwise:
    return layerwise.by_layer(tx, cfg.train.grad_clip)
  if cfg.train.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), tx)
  return tx


# ----------------------------------------------------------------------------- steps


def galore_states(opt_state) -> list[GaLoreState]:
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
          if isinstance(s, GaLoreState)]


def _changed(new: projection.Basis, old: projection.Basis) -> jax.Array:
  """Whether a refresh replaced the basis (its first column moved: a new SVD never reproduces it bit for bit)."""
  return jnp.any(jnp.stack([jnp.any(n[..., 0] != o[..., 0]) for n, o in zip(new, old) if n is not None]))


def refresh_overlap(old_opt_state, new_opt_state) -> jax.Array:
  """Mean subspace overlap (in [0, 1]) of the bases this step's refresh replaced; NaN when none was.

  Per leaf, so it is right under ``stagger`` and ``adaptive_gap`` too. The first refresh replaces
  placeholder bases and reports NaN.
  """
  olds, news = galore_states(old_opt_state), galore_states(new_opt_state)
  pairs = [(o, n) for old, new in zip(olds, news) for o, n in zip(old.bases.values(), new.bases.values())]
  if not pairs:
    return jnp.float32(jnp.nan)
  changed = jnp.stack([_changed(n, o) for o, n in pairs]) & (olds[0].count > 0)

  def overlap(_):
    overlaps = jnp.stack([projection.subspace_overlap(n, o) for o, n in pairs])
    return jnp.sum(jnp.where(changed, overlaps, 0.0)) / jnp.sum(changed)

  return jax.lax.cond(jnp.any(changed), overlap, lambda _: jnp.float32(jnp.nan), None)


def loss_and_tokens(model: llama.Llama, batch: dict[str, jax.Array], packed: bool) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy (fp32) over unmasked targets, and their number."""
  segments = (batch["segment_ids"], batch["positions"]) if packed else (None, None)
  logits_BSV = model(batch["inputs"], *segments)
  losses_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV.astype(jnp.float32), batch["targets"])
  mask_BS = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(losses_BS * mask_BS), jnp.sum(mask_BS)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps of a run."""

  train: Callable[..., Any]
  eval: Callable[..., Any]


def make_steps(graphdef, tx: optax.GradientTransformation, *, grad_accum: int, packed: bool,
               report_overlap: bool = False, layerwise_updates: bool = False,
               layout: sharding.Layout | None = None) -> Steps:
  """``train(params, opt_state, batch) -> (params, opt_state, metrics)``, donated; ``eval(params, batch)``.

  A batch of ``B`` sequences is split into ``grad_accum`` micro-batches scanned in order; the
  gradient is the per-token mean over the whole batch, as if it had been one. With
  ``layerwise_updates`` (``tx`` a :class:`~galore_jax.layerwise.ByLayer`) the step sweeps the
  backward pass layer by layer and updates each layer as soon as its gradient is complete.
  With a :class:`~galore_jax.sharding.Layout` the steps are jitted with its shardings (inputs and
  outputs) and run under its mesh; the metrics come back replicated.
  """

  def summed_loss(params, batch):
    return loss_and_tokens(nnx.merge(graphdef, params), batch, packed)

  def grads_of(params, batch):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, micro_batch):
      (loss, tokens), grads = jax.value_and_grad(summed_loss, has_aux=True)(params, micro_batch)
      return jax.tree.map(jnp.add, carry, (loss, tokens, grads)), None

    zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
    (loss, tokens, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    tokens = jnp.maximum(tokens, 1.0)
    return loss / tokens, tokens, jax.tree.map(lambda g: (g / tokens).astype(g.dtype), grads)

  def whole_tree_train(params, opt_state, batch):
    loss, tokens, grads = grads_of(params, batch)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": _global_norm(grads)}
    if report_overlap:
      metrics["subspace_overlap"] = refresh_overlap(opt_state, new_opt_state)
    return optax.apply_updates(params, updates), new_opt_state, metrics

  def evaluate(params, batch):
    return summed_loss(params, batch)

  if layerwise_updates:
    if not isinstance(tx, layerwise.ByLayer):
      raise TypeError("layerwise_updates needs a layerwise.ByLayer optimizer (train.layerwise=True)")
    train = layerwise.make_train(graphdef, tx, grad_accum=grad_accum, packed=packed,
                                 overlap=refresh_overlap if report_overlap else None)
  else:
    train = whole_tree_train
  if layout is not None:
    return Steps(train=layout.jit_train(train), eval=layout.jit_eval(evaluate))
  return Steps(train=jax.jit(train, donate_argnums=(0, 1)), eval=jax.jit(evaluate))


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(tree)


def params_of(model: llama.Llama) -> dict:
  state = nnx.state(model, nnx.Param)
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def flops_per_token(model_cfg: llama.LlamaConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6·N for the matmuls plus the attention scores (PaLM appendix B)."""
  attention = 12 * model_cfg.num_hidden_layers * model_cfg.num_attention_heads * model_cfg.head_dim * seq_len
  return 6.0 * n_params + attention


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
