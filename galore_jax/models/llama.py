"""Llama in Flax NNX, with the GaLore paper's configurations.

Shapes are spelled in names with one letter per axis:

  B: batch            S: sequence (queries)   T: keys (sequence or cache length)
  D: hidden_size      F: intermediate_size    V: vocab_size
  N: attention heads  K: key/value heads      H: head_dim
  L: layers

Parameter paths read like the reference's module names
(``layers/0/attn/q_proj/kernel``, ``layers/0/mlp/down_proj/kernel``,
``embed/embedding``, ``lm_head/kernel``, ``layers/0/input_norm/scale``), so that
the optimizer's default target ``attn|mlp`` on 2-D leaves selects exactly the
attention and MLP matrices. Kernels use Flax's ``(in, out)`` layout: the torch
weight transposed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "MLP",
    "RMSNorm",
    "apply_rope",
    "count_params",
    "generate",
    "init_cache",
    "preset",
    "rope_inv_freq",
    "segment_positions",
]

# flax < 0.12 has no nnx.List and takes plain lists of modules.
_List = getattr(nnx, "List", list)
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn", None)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama model (Hugging Face field names).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_hidden_layers,
      num_attention_heads: as in ``transformers.LlamaConfig``.
    num_key_value_heads: grouped-query attention; ``None`` means
      ``num_attention_heads`` (plain multi-head attention).
    head_dim: ``None`` means ``hidden_size // num_attention_heads``.
    max_position_embeddings: longest sequence (also the default cache size).
    rms_norm_eps: RMSNorm epsilon (the reference's 1e-6).
    rope_theta: RoPE base.
    rope_scaling: ``None`` or a dict with ``rope_type='llama3'``, ``factor``,
      ``low_freq_factor``, ``high_freq_factor`` and
      ``original_max_position_embeddings``.
    tie_word_embeddings: share the embedding matrix with the output layer.
    param_dtype: storage dtype of the parameters.
    dtype: compute dtype of the matmuls (norms and softmax run in fp32, logits
      are returned in fp32).
    remat: rematerialize each decoder block in the backward pass.
    remat_policy: name of a ``jax.checkpoint_policies`` member, e.g.
      ``'nothing_saveable'``, ``'dots_saveable'``,
      ``'dots_with_no_batch_dims_saveable'``.
    scan_layers: stack the layers' parameters on a leading axis (kernels
      ``(L, in, out)``) and run them with ``lax.scan`` (one compiled block).
    attention_impl: ``'auto'`` (cuDNN flash attention on GPU for bf16/fp16
      causal attention without segments, else XLA), ``'xla'``, ``'cudnn'`` or
      ``None`` (JAX's own choice).
  """

  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1376
  num_hidden_layers: int = 8
  num_attention_heads: int = 8
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 1024
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  tie_word_embeddings: bool = False
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  attention_impl: str | None = "auto"

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    for name in _POSITIVE_SIZES:
      _check_positive_int(name, getattr(self, name))
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                         f"{self.num_attention_heads}; give head_dim explicitly")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    _check_positive_int("num_key_value_heads", self.num_key_value_heads)
    _check_positive_int("head_dim", self.head_dim)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    for name in ("param_dtype", "dtype"):
      set_(name, jnp.dtype(getattr(self, name)))
      if not jnp.issubdtype(getattr(self, name), jnp.floating):
        raise ValueError(f"{name} must be a floating-point dtype, got {getattr(self, name)}")
    set_("rope_scaling", _normalize_rope_scaling(self.rope_scaling))
    if not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise ValueError(f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies member")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}")

  def __hash__(self):
    # rope_scaling is a dict; the config is a static attribute of the modules
    # and so must be hashable for jit.
    fields = dataclasses.astuple(self)
    return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else f for f in fields))

  def replace(self, **overrides) -> "LlamaConfig":
    return dataclasses.replace(self, **overrides)


_POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _normalize_rope_scaling(scaling):
  if scaling is None:
    return None
  scaling = dict(scaling)
  rope_type = scaling.pop("rope_type", scaling.pop("type", "llama3"))
  scaling.pop("rope_theta", None)
  if rope_type == "default":
    return None
  if rope_type != "llama3":
    raise ValueError(f"rope_scaling: only rope_type 'default' and 'llama3' are supported, got {rope_type!r}")
  missing = [k for k in _ROPE_SCALING_KEYS if k not in scaling]
  if missing:
    raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}")
  return {"rope_type": "llama3", **{k: scaling[k] for k in _ROPE_SCALING_KEYS}}


def _galore_config(hidden, inter, heads, layers, max_pos=1024) -> LlamaConfig:
  return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, max_position_embeddings=max_pos, rms_norm_eps=1e-6)


# The reference's configs/llama_*.json (github.com/jiaweizzhao/GaLore), plus Llama-3-8B.
PRESETS: dict[str, LlamaConfig] = {
    "llama_9m": _galore_config(128, 352, 4, 4),
    "llama_20m": _galore_config(256, 688, 4, 4),
    "llama_35m": _galore_config(384, 1024, 8, 6),
    "llama_60m": _galore_config(512, 1376, 8, 8),
    "llama_130m": _galore_config(768, 2048, 12, 12),
    "llama_350m": _galore_config(1024, 2736, 16, 24),
    "llama_1b": _galore_config(2048, 5461, 32, 24),
    "llama_3b": _galore_config(2560, 6848, 32, 32),
    "llama_7b": _galore_config(4096, 11008, 32, 32, max_pos=2048),
    "llama3_8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
}


def preset(name: str, **overrides) -> LlamaConfig:
  """A preset config by name, with fields replaced, e.g. ``preset('llama_60m', dtype='bfloat16')``."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  base = PRESETS[name]
  # A preset's head_dim (and, without grouped-query attention, its key/value heads) follow from its width and
  # heads, as in transformers.LlamaConfig: they follow an override of those too unless given themselves.
  if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & overrides.keys():
    overrides["head_dim"] = None
  if ("num_key_value_heads" not in overrides and "num_attention_heads" in overrides
      and base.num_key_value_heads == base.num_attention_heads):
    overrides["num_key_value_heads"] = None
  return base.replace(**overrides)


# ----------------------------------------------------------------------------- rotary embeddings


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
  # float32 like transformers, so long positions round the same way.
  inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  inv_freq = inv_freq.astype(np.float32)
  if scaling is None:
    return inv_freq
  s = dict(scaling)
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_context = s["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies ``[H/2]`` (transformers' default and ``llama3`` rules)."""
  scaling = None if config.rope_scaling is None else tuple(sorted(config.rope_scaling.items()))
  return _inv_freq(config.head_dim, float(config.rope_theta), scaling)


def rope_cos_sin(positions_BS: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
  """``cos, sin`` of shape ``[B, S, H]`` in fp32, halves repeated as in HF."""
  freqs_BSh = positions_BS[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
  angles_BSH = jnp.concatenate([freqs_BSh, freqs_BSh], axis=-1)
  return jnp.cos(angles_BSH), jnp.sin(angles_BSH)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BSNH: jax.Array, cos_BSH: jax.Array, sin_BSH: jax.Array) -> jax.Array:
  """HF's ``rotate_half`` RoPE, computed in fp32."""
  x = x_BSNH.astype(jnp.float32)
  cos, sin = cos_BSH[:, :, None, :], sin_BSH[:, :, None, :]
  return (x * cos + _rotate_half(x) * sin).astype(x_BSNH.dtype)


def segment_positions(segment_ids_BS: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes."""
  S = segment_ids_BS.shape[1]
  idx_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), segment_ids_BS.shape)
  starts_BS = jnp.concatenate(
      [jnp.ones_like(segment_ids_BS[:, :1], bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]], axis=1)
  start_idx_BS = jax.lax.cummax(jnp.where(starts_BS, idx_BS, 0), axis=1)
  return idx_BS - start_idx_BS


# ----------------------------------------------------------------------------- modules


def _init():
  return nnx.initializers.normal(stddev=0.02)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=_init(), rngs=rngs)


@jax.custom_vjp
def take_rows(table_VD: jax.Array, ids: jax.Array) -> jax.Array:
  """``table_VD[ids]``, whose gradient is scattered into zeros created only once the cotangent exists.

  ``jnp.take``'s own gradient scatters into a constant ``[V, D]`` buffer of zeros, which XLA may create
  anywhere in the program: in the layerwise step at Llama-7B it fused the zeros of the norm pass and of the
  update pass into one kernel at the start and kept the second 0.26 GB buffer alive across the whole sweep.
  (The whole-tree step keeps ``jnp.take``: there the barrier below reordered its update and cost 3.7 GB.)
  """
  return jnp.take(table_VD, ids, axis=0)


def _take_rows_fwd(table_VD, ids):
  return take_rows(table_VD, ids), (ids, table_VD)  # the table for its shape: the parameter itself, no copy


def _take_rows_bwd(residuals, dy):
  ids, table = residuals
  zero, dy = jax.lax.optimization_barrier((jnp.zeros((), table.dtype), dy))  # a zero that waits for dy
  d_table = jnp.broadcast_to(zero, table.shape).at[ids].add(dy.astype(table.dtype))
  return d_table, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


class Embed(nnx.Embed):
  """``nnx.Embed`` (same parameter, call and ``attend``) with :meth:`rows`."""

  def rows(self, ids: jax.Array) -> jax.Array:
    """``self(ids)`` by :func:`take_rows`: the same values, its gradient's zeros created when it is needed."""
    (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    return take_rows(table, ids)


class RMSNorm(nnx.Module):
  """RMSNorm computed in fp32; the normalized input is cast back before the scale (as HF)."""

  def __init__(self, dim: int, cfg: LlamaConfig):
    self.eps = cfg.rms_norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype))

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    x = x_BSD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BSD.dtype) * y.astype(x_BSD.dtype)


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

  def __call__(self, x_BSD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))


class LayerCache(NamedTuple):
  """One layer's keys and values, ``[B, T, K, H]`` (or ``[L, B, T, K, H]`` when stacked)."""
  k: jax.Array
  v: jax.Array


class KVCache(NamedTuple):
  """Keys/values of every layer and the number of positions already written.

  ``layers`` is a tuple of :class:`LayerCache` (one per layer), or a single
  stacked :class:`LayerCache` for ``scan_layers`` models.
  """
  layers: Any
  index: jax.Array


def _attention_impl(cfg: LlamaConfig, dtype, has_mask: bool):
  if cfg.attention_impl != "auto":
    return cfg.attention_impl
  if has_mask or jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  return "cudnn"


def _dot_product_attention(cfg, q_BSNH, k_BTKH, v_BTKH, mask_B1ST, is_causal):
  impl = _attention_impl(cfg, q_BSNH.dtype, mask_B1ST is not None)
  attend = functools.partial(jax.nn.dot_product_attention, q_BSNH, k_BTKH, v_BTKH, mask=mask_B1ST,
                             is_causal=is_causal)
  if impl == "cudnn" and cfg.attention_impl == "auto":
    try:
      return attend(implementation="cudnn")
    except Exception:  # unsupported shape/dtype/version for cuDNN: fall back at trace time.
      return attend(implementation="xla")
  return attend(implementation=impl)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    N, K, H, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    self.q_proj = _linear(cfg, D, N * H, rngs)
    self.k_proj = _linear(cfg, D, K * H, rngs)
    self.v_proj = _linear(cfg, D, K * H, rngs)
    self.o_proj = _linear(cfg, N * H, D, rngs)

  def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_B1ST=None, cache: LayerCache | None = None,
               cache_index=None) -> tuple[jax.Array, LayerCache | None]:
    """Attend; with ``cache``, write this chunk's keys/values at ``cache_index`` and attend to the cache.

    Without a cache and without ``mask_B1ST`` the attention is causal.
    """
    cfg = self.cfg
    B, S, _ = x_BSD.shape
    q_BSNH = self.q_proj(x_BSD).reshape(B, S, cfg.num_attention_heads, cfg.head_dim)
    k_BSKH = self.k_proj(x_BSD).reshape(B, S, cfg.num_key_value_heads, cfg.head_dim)
    v_BSKH = self.v_proj(x_BSD).reshape(B, S, cfg.num_key_value_heads, cfg.head_dim)
    q_BSNH = apply_rope(q_BSNH, cos_BSH, sin_BSH)
    k_BSKH = apply_rope(k_BSKH, cos_BSH, sin_BSH)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k_BTKH = jax.lax.dynamic_update_slice(cache.k, k_BSKH.astype(cache.k.dtype), start)
      v_BTKH = jax.lax.dynamic_update_slice(cache.v, v_BSKH.astype(cache.v.dtype), start)
      cache = LayerCache(k_BTKH, v_BTKH)
      k_BTKH, v_BTKH = k_BTKH.astype(q_BSNH.dtype), v_BTKH.astype(q_BSNH.dtype)
    else:
      k_BTKH, v_BTKH = k_BSKH, v_BSKH
    out_BSNH = _dot_product_attention(cfg, q_BSNH, k_BTKH, v_BTKH, mask_B1ST, is_causal=mask_B1ST is None)
    return self.o_proj(out_BSNH.reshape(B, S, -1)), cache


class Block(nnx.Module):
  """Pre-norm decoder block: attention then SwiGLU MLP, each with a residual."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BSD, cos_BSH, sin_BSH, mask_B1ST=None, cache=None, cache_index=None):
    h_BSD, cache = self.attn(self.input_norm(x_BSD), cos_BSH, sin_BSH, mask_B1ST, cache, cache_index)
    x_BSD = x_BSD + h_BSD
    x_BSD = x_BSD + self.mlp(self.post_attention_norm(x_BSD))
    return x_BSD, cache


def _remat_block_forward(block: Block, policy_name: str, *args):
  """``block(*args)`` rematerialized in the backward pass with the named policy.

  Splits the block and calls ``jax.checkpoint`` on a pure function rather than
  using ``nnx.remat``, so that the model also works when closed over by an
  outer JAX loop (e.g. the decode ``fori_loop``) at another trace level.
  """
  graphdef, state = nnx.split(block)

  def forward(state, *args):
    return nnx.merge(graphdef, state)(*args)

  policy = getattr(jax.checkpoint_policies, policy_name)
  return jax.checkpoint(forward, policy=policy)(state, *args)


def attention_inputs(cfg: LlamaConfig, shape_BS: tuple[int, int], segment_ids_BS=None, positions_BS=None):
  """RoPE ``(cos, sin)`` and the attention mask (``None`` = plain causal) of a forward pass without cache."""
  B, S = shape_BS
  mask_B1ST = None
  if segment_ids_BS is not None:
    segment_ids_BS = jnp.asarray(segment_ids_BS)
    if positions_BS is None:
      positions_BS = segment_positions(segment_ids_BS)
    same_BST = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    causal_ST = jnp.tril(jnp.ones((S, S), bool))
    mask_B1ST = (same_BST & causal_ST)[:, None]
  if positions_BS is None:
    positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cos_BSH, sin_BSH = rope_cos_sin(jnp.asarray(positions_BS), cfg)
  return cos_BSH, sin_BSH, mask_B1ST


class Llama(nnx.Module):
  """Llama causal language model.

  ``model(input_ids[B,S]) -> logits[B,S,V]`` (fp32). Optional ``segment_ids[B,S]``
  restrict attention to tokens of the same segment (packed sequences) and,
  unless ``positions[B,S]`` are given, restart positions at each segment.
  With ``cache`` (see :func:`init_cache`) returns ``(logits, new_cache)``.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_init(), rngs=rngs)
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      self.layers = _List([Block(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

  def __call__(self, input_ids, segment_ids=None, positions=None, cache: KVCache | None = None):
    """Logits ``[B, S, V]`` (fp32) for ``input_ids[B, S]``.

    Args:
      input_ids: token ids ``[B, S]``.
      segment_ids: optional ``[B, S]`` ids of packed sequences; tokens attend
        only to earlier tokens of the same segment.
      positions: optional ``[B, S]`` RoPE positions (default: ``0..S-1``,
        restarting at each segment; after the cache's index with a cache).
      cache: optional :class:`KVCache`; then returns ``(logits, new_cache)``.
    """
    cfg = self.config
    input_ids_BS, segment_ids_BS, positions_BS = jnp.asarray(input_ids), segment_ids, positions
    B, S = input_ids_BS.shape
    mask_B1ST, cache_index = None, None
    if cache is not None:
      if segment_ids_BS is not None:
        raise ValueError("segment_ids are not supported together with a KV cache")
      cache_index = cache.index
      if positions_BS is None:
        positions_BS = jnp.broadcast_to(cache_index + jnp.arange(S, dtype=jnp.int32), (B, S))
      T = _cache_length(cache, cfg)
      # Slots beyond the current query are either future or unwritten.
      q_pos_S = cache_index + jnp.arange(S)
      mask_B1ST = (jnp.arange(T)[None, :] <= q_pos_S[:, None])[None, None]
    if cache is None:
      cos_BSH, sin_BSH, mask_B1ST = attention_inputs(cfg, (B, S), segment_ids_BS, positions_BS)
    else:
      cos_BSH, sin_BSH = rope_cos_sin(jnp.asarray(positions_BS), cfg)

    x_BSD = self.embed(input_ids_BS)
    layer_caches = None if cache is None else cache.layers
    if cfg.scan_layers:
      x_BSD, layer_caches = self._scan_layers(x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_caches, cache_index)
    else:
      x_BSD, layer_caches = self._loop_layers(x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_caches, cache_index)
    logits_BSV = self.head(x_BSD)
    if cache is None:
      return logits_BSV
    return logits_BSV, KVCache(layer_caches, cache_index + S)

  def head(self, x_BSD: jax.Array) -> jax.Array:
    """fp32 logits ``[B, S, V]`` of the last block's output: final norm, then lm_head (or the tied embedding)."""
    x_BSD = self.final_norm(x_BSD)
    logits_BSV = self.embed.attend(x_BSD) if self.config.tie_word_embeddings else self.lm_head(x_BSD)
    return logits_BSV.astype(jnp.float32)

  def _loop_layers(self, x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_caches, cache_index):
    cfg = self.config
    new_caches = []
    for i, block in enumerate(self.layers):
      layer_cache = None if layer_caches is None else layer_caches[i]
      args = (x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_cache, cache_index)
      if cfg.remat:
        x_BSD, layer_cache = _remat_block_forward(block, cfg.remat_policy, *args)
      else:
        x_BSD, layer_cache = block(*args)
      new_caches.append(layer_cache)
    return x_BSD, None if layer_caches is None else tuple(new_caches)

  def _scan_layers(self, x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_caches, cache_index):
    cfg = self.config
    graphdef, state = nnx.split(self.layers)

    def body(x_BSD, xs):
      layer_state, layer_cache = xs
      block = nnx.merge(graphdef, layer_state)
      return block(x_BSD, cos_BSH, sin_BSH, mask_B1ST, layer_cache, cache_index)

    if cfg.remat:
      body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, cfg.remat_policy), prevent_cse=False)
    x_BSD, layer_caches = jax.lax.scan(body, x_BSD, (state, layer_caches))
    return x_BSD, layer_caches


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
  """One :class:`Block` whose parameters carry a leading layer axis."""

  @nnx.split_rngs(splits=cfg.num_hidden_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Block(cfg, rngs=rngs)

  return create(rngs)


def count_params(config: LlamaConfig) -> int:
  """Number of parameters, computed from shapes only (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ----------------------------------------------------------------------------- generation


def _cache_length(cache: KVCache, cfg: LlamaConfig) -> int:
  first = cache.layers if cfg.scan_layers else cache.layers[0]
  return first.k.shape[-3]


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
  """An empty cache for ``max_length`` positions (``dtype`` defaults to the compute dtype)."""
  dtype = config.dtype if dtype is None else dtype
  shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
  if config.scan_layers:
    shape = (config.num_hidden_layers, *shape)
    layers = LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  else:
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(config.num_hidden_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32))


def _sample(logits_BV, rng, temperature: float, top_k: int | None):
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k is not None:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def _generate(graphdef, state, prompt_BP, rng, *, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  B, P = prompt_BP.shape
  cache = init_cache(model.config, B, P + max_new_tokens)
  logits_BPV, cache = model(prompt_BP, cache=cache)
  rng, sub = jax.random.split(rng)
  tokens_BL = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt_BP)
  tokens_BL = tokens_BL.at[:, P].set(_sample(logits_BPV[:, -1], sub, temperature, top_k))

  def step(i, carry):
    tokens_BL, cache, rng = carry
    current_B1 = jax.lax.dynamic_slice_in_dim(tokens_BL, P + i, 1, axis=1)
    logits_B1V, cache = model(current_B1, cache=cache)
    rng, sub = jax.random.split(rng)
    next_B1 = _sample(logits_B1V[:, -1], sub, temperature, top_k)[:, None]
    return jax.lax.dynamic_update_slice_in_dim(tokens_BL, next_B1, P + i + 1, axis=1), cache, rng

  tokens_BL, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (tokens_BL, cache, rng))
  return tokens_BL


def generate(model: Llama, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             rng: jax.Array | None = None) -> jax.Array:
  """Continue ``prompt_ids[B,P]`` by ``max_new_tokens`` tokens with a KV cache.

  Greedy when ``temperature`` is 0, else sampled (optionally from the
  ``top_k`` most likely tokens). All prompts share the length ``P`` (no
  padding). Returns ``[B, P + max_new_tokens]`` token ids, prompt included.
  """
  prompt_BP = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_BP.ndim != 2:
    raise ValueError(f"prompt_ids must be [batch, length], got shape {prompt_BP.shape}")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  if max_new_tokens == 0:
    return prompt_BP
  if top_k is not None and top_k <= 0:
    raise ValueError(f"top_k must be positive, got {top_k}")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_BP, rng, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=top_k)
