"""A run's config turned into its parts: checks, the model, the learning-rate schedule, the optimizer.

The ``optimizer`` section's GaLore keys are the fields of :class:`~galore_jax.GaLoreOptions`
(:data:`GALORE_KEYS`): a new GaLore option reaches the config, ``--config.optimizer.*`` and
:func:`build_optimizer` without touching this file. Fira reads them all (``scale`` is its α); APOLLO
takes its scale and projection from its own keys (``apollo_scale``, ``apollo_proj``), APOLLO-Mini
is rank 1, GoLore carries the first moment (``on_refresh="project_first"``) and switches at
``golore_switch_step``, Q-GaLore has int4 bases and the adaptive gap (:func:`optimizer_options`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from galore_jax.models import llama
from galore_jax.optim import AdaptiveGap, GaLoreOptions, galore_adafactor, galore_adamw, galore_adamw_8bit
from galore_jax.optim import apollo_adamw, apollo_mini, fira_adamw, golore_adamw, q_galore_adamw, scale_by_adam_8bit
from galore_jax.optim import guard
from galore_jax.optim import refresh as refresh_lib
from galore_jax.optim.apollo import SCALE_TYPES
from galore_jax.train import divergence, layerwise, sharding, steps

# GaLoreOptions' fields a command line can set (target and dimension_numbers are code: use the library for those).
GALORE_KEYS = tuple(f.name for f in dataclasses.fields(GaLoreOptions) if f.name not in ("target", "dimension_numbers"))
MODEL_OVERRIDES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


class ConfigError(ValueError):
  """A config value that cannot work; the message names it."""


def _positive(name: str, value) -> None:
  if value is None or value <= 0:
    raise ConfigError(f"{name} must be positive, got {value!r}")


def _finite_numbers(cfg, prefix: str = "") -> None:
  """Every float of the config is finite: ``--config.train.lr=nan`` passes every comparison (NaN <= 0 is False)."""
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      _finite_numbers(value, f"{prefix}{key}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{prefix}{key} must be a finite number, got {value!r}")


def _validate_fault_policy(cfg) -> None:
  """What a run does on a non-finite step, and which checkpoint it resumes from."""
  if cfg.train.nonfinite not in divergence.POLICIES:
    raise ConfigError(f"train.nonfinite must be one of {divergence.POLICIES}, got {cfg.train.nonfinite!r}")
  _positive("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps)
  if cfg.checkpoint.resume_step is not None and cfg.checkpoint.resume_step < 0:
    raise ConfigError(f"checkpoint.resume_step must be a saved step (>= 0), got {cfg.checkpoint.resume_step}")


def validate(cfg) -> None:
  """Check the values a run depends on before anything is built or written."""
  _finite_numbers(cfg)
  _validate_fault_policy(cfg)
  for name in ("train.batch_size", "train.grad_accum", "train.steps", "train.log_every", "train.lr", "data.seq_len",
               "eval.every", "eval.batches", "checkpoint.every", "checkpoint.keep"):
    _positive(name, _value(cfg, name))
  for name in ("seed", "train.warmup_steps", "train.grad_clip", "optimizer.weight_decay", "optimizer.eps"):
    _at_least_zero(name, _value(cfg, name))
  if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
    raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by train.grad_accum "
                      f"{cfg.train.grad_accum}")
  if cfg.optimizer.name not in BUILDERS:
    raise ConfigError(f"optimizer.name {cfg.optimizer.name!r} is not one of {tuple(BUILDERS)}")
  _validate_moments(cfg.optimizer)
  if cfg.optimizer.name in LOW_RANK:
    _validate_low_rank(cfg.optimizer, learning_rate_schedule(cfg.train))
  if cfg.optimizer.name.endswith("8bit") and cfg.optimizer.block_size not in (256, 2048):
    raise ConfigError(f"optimizer.block_size must be 256 or 2048, got {cfg.optimizer.block_size}")
  _validate_mesh(cfg)
  model_cfg = model_config(cfg)
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                      f"{model_cfg.max_position_embeddings}")
  # Fira's and APOLLO's rules refuse some projections of some kernels at init; int4 bases need groups that fit
  quantized = cfg.optimizer.name == "q_galore_adamw" or str(cfg.optimizer.basis_dtype) == "int4"
  if cfg.optimizer.name in CHECKS_LEAVES or (cfg.optimizer.name in LOW_RANK and quantized):
    try:
      jax.eval_shape(build_optimizer(cfg).init, steps.params_of(abstract_model(cfg)))
    except ValueError as e:
      key = "basis_group_size" if "basis_dtype='int4'" in str(e) else "proj_type"
      raise ConfigError(f"optimizer.{key}={cfg.optimizer[key]!r}: {e}") from None


def _value(cfg, dotted_name: str):
  for key in dotted_name.split("."):
    cfg = cfg[key]
  return cfg


def _at_least_zero(name: str, value) -> None:
  if value is None or value < 0:
    raise ConfigError(f"{name} must be >= 0, got {value!r}")


def _validate_moments(o) -> None:
  """Adam's decay rates, and the update scale of the optimizers that multiply by it (APOLLO has its own)."""
  for key in ("b1", "b2") + (("adafactor_beta1",) if o.adafactor_beta1 is not None else ()):
    if not 0.0 <= o[key] < 1.0:  # b2 = 1 divides by a zero bias correction
      raise ConfigError(f"optimizer.{key} must be in [0, 1), got {o[key]!r}")
  if o.name in LOW_RANK - APOLLO and not o.scale > 0:
    raise ConfigError(f"optimizer.scale must be positive (GaLore's α; the reference uses 0.25), got {o.scale!r}")


def _validate_low_rank(o, schedule) -> None:
  """The low-rank optimizers' keys, then the optimizer built from them (its own checks, as config errors)."""
  if o.name in LIMITED and o.norm_growth_limit != 0 and not o.norm_growth_limit > 1:
    raise ConfigError(f"optimizer.norm_growth_limit must be > 1 (γ; the references use 1.01) or 0 (off), "
                      f"got {o.norm_growth_limit!r}")
  if o.name in APOLLO:
    if o.apollo_scale_type not in SCALE_TYPES:
      raise ConfigError(f"optimizer.apollo_scale_type must be one of {SCALE_TYPES}, got {o.apollo_scale_type!r}")
    if o.apollo_proj not in APOLLO_PROJECTIONS:
      raise ConfigError(f"optimizer.apollo_proj must be one of {APOLLO_PROJECTIONS}, got {o.apollo_proj!r}")
    if o.apollo_scale is not None and not o.apollo_scale > 0:
      raise ConfigError(f"optimizer.apollo_scale must be positive, got {o.apollo_scale!r}")
  if o.name == "golore_adamw":
    step = o.golore_switch_step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ConfigError(f"optimizer.golore_switch_step must be an int >= 0 (None is resolved to 80% of train.steps), "
                        f"got {step!r}")
  options = optimizer_options(o)  # the GaLore keys' own ConfigErrors
  try:
    BUILDERS[o.name](o, schedule, options)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer.{e}") from None


def _validate_mesh(cfg) -> None:
  """The mesh fits the devices, and every micro-batch and eval batch splits over all of them."""
  if "mesh" not in cfg:
    return
  if cfg.mesh.axis_types not in sharding.AXIS_TYPES:
    raise ConfigError(f"mesh.axis_types must be one of {sharding.AXIS_TYPES}, got {cfg.mesh.axis_types!r}")
  _at_least_zero("mesh.min_shard_size", cfg.mesh.min_shard_size)
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
  """A new model: the weights of ``model.hf_checkpoint`` (:class:`ConfigError` if they do not load), else random."""
  model_cfg = model_config(cfg)
  if cfg.model.hf_checkpoint:
    from galore_jax.models import hf
    overrides = {k: getattr(model_cfg, k) for k in ("remat", "remat_policy", "scan_layers")}
    try:
      return hf.from_hf(cfg.model.hf_checkpoint, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                        **overrides)
    except (OSError, ValueError, KeyError) as e:  # the checkpoint's files: missing, damaged or another model's
      raise ConfigError(f"model.hf_checkpoint: {e}") from None
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


APOLLO = frozenset({"apollo_adamw", "apollo_mini"})
APOLLO_PROJECTIONS = ("random", "svd")


def optimizer_options(optimizer_cfg) -> dict[str, Any]:
  """The GaLore options a low-rank optimizer of the config is built with.

  The GaLore keys as they are, except for APOLLO: ``refresh`` comes from ``apollo_proj`` and ``scale`` from
  ``apollo_scale`` (``None``: the method's own, 1 for APOLLO and 128 for APOLLO-Mini; GaLore's α would mean
  something else), and APOLLO-Mini's rank is 1 whatever ``optimizer.rank`` says.
  """
  o = optimizer_cfg
  options = galore_options(o).as_kwargs()
  if o.name in APOLLO:
    options["refresh"] = o.apollo_proj
    del options["scale"]
    if o.apollo_scale is not None:
      options["scale"] = o.apollo_scale
    if o.name == "apollo_mini":
      options["rank"] = 1
  if o.name == "golore_adamw":
    options["on_refresh"] = "project_first"  # the reference's carry: first moment rotated, second kept
  if o.name == "q_galore_adamw":
    options.update(basis_dtype="int4", adaptive_gap=AdaptiveGap())
  return options


def reports_overlap(cfg) -> bool:
  """Whether the run's bases are orthonormal, so that the subspace overlap of a refresh means something."""
  if cfg.optimizer.name not in LOW_RANK:
    return False
  return refresh_lib.is_orthonormal(refresh_lib.resolve(optimizer_options(cfg.optimizer)["refresh"]))


def _dtype_or_none(name):
  """Config dtypes: a name, or None / 'None' / '' for the default."""
  return None if name in (None, "", "None", "none") else name


# Each optimizer name → how the config's ``optimizer`` section builds it, given the learning-rate schedule. The
# low-rank ones take the GaLore options (GALORE_KEYS) too; adding a method is adding a builder here.


def _galore_adamw(o, schedule, options):
  return galore_adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      moment_dtype=_dtype_or_none(o.moment_dtype), **options)


def _galore_adamw_8bit(o, schedule, options):
  return galore_adamw_8bit(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           block_size=o.block_size, min_8bit_size=o.min_8bit_size, **options)


def _galore_adafactor(o, schedule, options):
  return galore_adafactor(schedule, beta1=o.adafactor_beta1, weight_decay=o.weight_decay, **options)


def _norm_growth_limit(o):
  return o.norm_growth_limit if o.norm_growth_limit else None  # 0: off (APOLLO's disable_nl)


def _fira_adamw(o, schedule, options):
  return fira_adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    moment_dtype=_dtype_or_none(o.moment_dtype), norm_growth_limit=_norm_growth_limit(o), **options)


def _apollo_adamw(o, schedule, options):
  return apollo_adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      moment_dtype=_dtype_or_none(o.moment_dtype), scale_type=o.apollo_scale_type,
                      scale_front=o.apollo_scale_front, norm_growth_limit=_norm_growth_limit(o), **options)


def _apollo_mini(o, schedule, options):
  return apollo_mini(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     moment_dtype=_dtype_or_none(o.moment_dtype), scale_front=o.apollo_scale_front,
                     norm_growth_limit=_norm_growth_limit(o), **options)


def _golore_adamw(o, schedule, options):
  return golore_adamw(schedule, switch_step=o.golore_switch_step, b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, moment_dtype=_dtype_or_none(o.moment_dtype), **options)


def _q_galore_adamw(o, schedule, options):
  return q_galore_adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        moment_dtype=_dtype_or_none(o.moment_dtype), **options)


def _adamw(o, schedule, options):
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mu_dtype=_dtype_or_none(o.moment_dtype))


def _adamw_8bit(o, schedule, options):
  return guard.chain(scale_by_adam_8bit(o.b1, o.b2, o.eps, block_size=o.block_size, min_8bit_size=o.min_8bit_size),
                     optax.add_decayed_weights(o.weight_decay), optax.scale_by_learning_rate(schedule))


BUILDERS = {
    "galore_adamw": _galore_adamw,
    "galore_adamw_8bit": _galore_adamw_8bit,
    "galore_adafactor": _galore_adafactor,
    "fira_adamw": _fira_adamw,
    "apollo_adamw": _apollo_adamw,
    "apollo_mini": _apollo_mini,
    "golore_adamw": _golore_adamw,
    "q_galore_adamw": _q_galore_adamw,
    "adamw": _adamw,
    "adamw_8bit": _adamw_8bit,
}
LOW_RANK = frozenset({"galore_adamw", "galore_adamw_8bit", "galore_adafactor", "fira_adamw", "golore_adamw",
                      "q_galore_adamw"} | APOLLO)  # GaLore options
LIMITED = frozenset({"fira_adamw"} | APOLLO)  # read optimizer.norm_growth_limit
CHECKS_LEAVES = frozenset({"fira_adamw", "apollo_adamw"})  # per-channel factors: some projections are refused at init


def build_optimizer(cfg) -> optax.GradientTransformation:
  """The config's optimizer, with global-norm clipping in front when ``train.grad_clip > 0``.

  With ``train.layerwise`` a :class:`~galore_jax.train.layerwise.ByLayer`: one state per decoder layer
  (stacked on a leading layer axis with ``model.scan_layers``).
  """
  o = cfg.optimizer
  options = optimizer_options(o) if o.name in LOW_RANK else {}
  tx = BUILDERS[o.name](o, learning_rate_schedule(cfg.train), options)
  if cfg.train.layerwise:
    return layerwise.by_layer(tx, cfg.train.grad_clip, stacked=cfg.model.scan_layers)
  if cfg.train.grad_clip > 0:
    tx = guard.chain(optax.clip_by_global_norm(cfg.train.grad_clip), tx)
  return tx


# String keys whose None means "not given" (a default chosen elsewhere); None, none or an empty value on the command
# line unsets them (ml_collections would otherwise keep the string 'None').
UNSET_SPELLINGS = (None, "", "None", "none")
OPTIONAL_STRINGS = ("model.hf_checkpoint", "data.path", "data.tokenizer", "optimizer.moment_dtype")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve(cfg) -> None:
  """Settle, in place, what the command line leaves implicit, before :func:`validate` and before the config is
  saved to ``config.json`` (so ``eval.py`` and :func:`galore_jax.train.load_model` see the same run):

  * the keys of :data:`OPTIONAL_STRINGS` given as ``None``/``none``/empty become None;
  * ``optimizer.golore_switch_step`` unset for ``golore_adamw`` is 80% of ``train.steps`` (the reference
    script's ``--rand_ratio 0.8``);
  * ``data.tokenizer`` unset with ``model.hf_checkpoint`` set is that checkpoint's directory: a fine-tune
    keeps the token ids its embedding was trained with. A checkpoint directory without tokenizer files
    (:data:`TOKENIZER_FILES`) is a :class:`ConfigError` (a BPE trained here would not match its ids).
  """
  for name in OPTIONAL_STRINGS:
    section, key = name.split(".")
    if cfg[section][key] in UNSET_SPELLINGS:
      cfg[section][key] = None
  if cfg.optimizer.name == "golore_adamw" and cfg.optimizer.get("golore_switch_step") is None:
    cfg.optimizer.golore_switch_step = int(0.8 * cfg.train.steps)
  checkpoint = cfg.model.hf_checkpoint
  if checkpoint is None or cfg.data.tokenizer is not None or not os.path.isdir(checkpoint):
    return  # a missing checkpoint directory is reported by validate (model_config)
  if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in TOKENIZER_FILES):
    raise ConfigError(f"model.hf_checkpoint {checkpoint!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                      "give one with --config.data.tokenizer=DIR")
  cfg.data.tokenizer = checkpoint
