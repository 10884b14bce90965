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

from galore_jax import projection
from galore_jax.models import llama
from galore_jax.transform import GaLoreState, galore_adamw

OPTIMIZERS = ("galore_adamw", "adamw")
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
  model_cfg = model_config(cfg)
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                      f"{model_cfg.max_position_embeddings}")


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
  o, schedule = cfg.optimizer, learning_rate_schedule(cfg.train)
  moment_dtype = _dtype_or_none(o.moment_dtype)
  if o.name == "galore_adamw":
    tx = galore_adamw(schedule, rank=o.rank, update_proj_gap=o.update_proj_gap, scale=o.scale,
                      proj_type=o.proj_type, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      on_refresh=o.on_refresh, basis_dtype=o.basis_dtype, moment_dtype=moment_dtype)
  else:
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mu_dtype=moment_dtype)
  if cfg.train.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), tx)
  return tx


# ----------------------------------------------------------------------------- steps


def galore_states(opt_state) -> list[GaLoreState]:
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GaLoreState))
          if isinstance(s, GaLoreState)]


def refresh_overlap(old_opt_state, new_opt_state, update_proj_gap: int) -> jax.Array:
  """Mean subspace overlap (in [0, 1]) of the bases a refresh step replaced; NaN on other steps.

  The first refresh replaces placeholder bases, so it reports NaN too.
  """
  pairs = [(old, new) for olds, news in zip(galore_states(old_opt_state), galore_states(new_opt_state))
           for old, new in zip(olds.bases.values(), news.bases.values())]
  if not pairs:
    return jnp.float32(jnp.nan)

  def overlap(_):
    return jnp.mean(jnp.stack([projection.subspace_overlap(new, old) for old, new in pairs]))

  count = galore_states(old_opt_state)[0].count
  return jax.lax.cond((count % update_proj_gap == 0) & (count > 0), overlap, lambda _: jnp.float32(jnp.nan), None)


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
               update_proj_gap: int | None) -> Steps:
  """``train(params, opt_state, batch) -> (params, opt_state, metrics)``, donated; ``eval(params, batch)``.

  A batch of ``B`` sequences is split into ``grad_accum`` micro-batches scanned in order; the
  gradient is the per-token mean over the whole batch, as if it had been one.
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

  def train(params, opt_state, batch):
    loss, tokens, grads = grads_of(params, batch)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": _global_norm(grads)}
    if update_proj_gap:
      metrics["subspace_overlap"] = refresh_overlap(opt_state, new_opt_state, update_proj_gap)
    return optax.apply_updates(params, updates), new_opt_state, metrics

  def evaluate(params, batch):
    return summed_loss(params, batch)

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
