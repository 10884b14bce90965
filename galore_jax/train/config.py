"""A run's config turned into its parts: checks, the model, the learning-rate schedule, the optimizer.

The ``optimizer`` section's GaLore keys are the fields of :class:`~galore_jax.GaLoreOptions`
(:data:`GALORE_KEYS`): a new GaLore option reaches the config, ``--config.optimizer.*`` and
:func:`build_optimizer` without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax
from flax import nnx

from galore_jax.models import llama
from galore_jax.optim import AdaptiveGap, GaLoreOptions, galore_adafactor, galore_adamw, galore_adamw_8bit
from galore_jax.optim import scale_by_adam_8bit
from galore_jax.train import layerwise, sharding

OPTIMIZERS = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "adamw", "adamw_8bit")
# GaLoreOptions' fields a command line can set (target and dimension_numbers are code: use the library for those).
GALORE_KEYS = tuple(f.name for f in dataclasses.fields(GaLoreOptions) if f.name not in ("target", "dimension_numbers"))
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
    galore_options(cfg.optimizer)
  if cfg.optimizer.name.endswith("8bit") and cfg.optimizer.block_size not in (256, 2048):
    raise ConfigError(f"optimizer.block_size must be 256 or 2048, got {cfg.optimizer.block_size}")
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


def galore_option_defaults() -> dict[str, Any]:
  """The GaLore keys of a config's ``optimizer`` section with their defaults (``adaptive_gap`` as a bool)."""
  defaults = {f.name: f.default for f in dataclasses.fields(GaLoreOptions) if f.name in GALORE_KEYS}
  return {**defaults, "adaptive_gap": False}


def galore_options(optimizer_cfg) -> GaLoreOptions:
  """The :class:`~galore_jax.GaLoreOptions` of a config's ``optimizer`` section; a bad value is a ConfigError."""
  values = {name: optimizer_cfg[name] for name in GALORE_KEYS}
  values["adaptive_gap"] = AdaptiveGap() if values["adaptive_gap"] else None
  try:
    return GaLoreOptions(**values)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer.{e}") from None


def _dtype_or_none(name):
  """Config dtypes: a name, or None / 'None' / '' for the default."""
  return None if name in (None, "", "None", "none") else name


def build_optimizer(cfg) -> optax.GradientTransformation:
  """The config's optimizer, with global-norm clipping in front when ``train.grad_clip > 0``.

  With ``train.layerwise`` a :class:`~galore_jax.train.layerwise.ByLayer`: one state per decoder layer
  (stacked on a leading layer axis with ``model.scan_layers``).
  """
  o, schedule = cfg.optimizer, learning_rate_schedule(cfg.train)
  moment_dtype = _dtype_or_none(o.moment_dtype)
  galore_args = {"weight_decay": o.weight_decay, **(galore_options(o).as_kwargs() if o.name.startswith("galore") else {})}
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
    return layerwise.by_layer(tx, cfg.train.grad_clip, stacked=cfg.model.scan_layers)
  if cfg.train.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), tx)
  return tx
