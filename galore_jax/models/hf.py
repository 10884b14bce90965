"""Hugging Face Llama checkpoints in and out of :class:`galore_jax.models.llama.Llama`.

:func:`from_hf` reads a local ``transformers`` Llama checkpoint directory
(``config.json`` and one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) tensor by tensor, so the host never holds a
second copy of the model. :func:`to_hf` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads; it needs no torch.

Torch ``Linear`` weights are ``(out, in)`` and Flax kernels ``(in, out)``: they
are transposed on the way in and out. HF's q/k projections already use the
``rotate_half`` RoPE convention of this model, so no permutation is needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from galore_jax.models.llama import Llama, LlamaConfig

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "hf_tensor_specs", "to_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER_TENSORS = (
    # (HF name inside model.layers.{i}, module path inside a Block, is a torch Linear weight)
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
    ("input_layernorm.weight", ("input_norm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_norm", "scale"), False),
)
# Non-persistent buffers that old checkpoints sometimes contain.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class TensorSpec(NamedTuple):
  """Where one HF tensor lives in the Flax model.

  ``path`` names the parameter (``layer`` is None) or, for stacked
  ``scan_layers`` models, the stacked parameter and ``layer`` its index.
  ``hf_shape`` is the torch shape.
  """
  name: str
  path: tuple
  layer: int | None
  transpose: bool
  hf_shape: tuple[int, ...]


def hf_tensor_specs(cfg: LlamaConfig) -> list[TensorSpec]:
  """The tensors of a HF ``LlamaForCausalLM`` with ``cfg``, in HF's order."""
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  NH, KH = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  layer_shapes = {
      "self_attn.q_proj.weight": (NH, D), "self_attn.k_proj.weight": (KH, D), "self_attn.v_proj.weight": (KH, D),
      "self_attn.o_proj.weight": (D, NH), "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
      "mlp.down_proj.weight": (D, F), "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
  }
  specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), None, False, (V, D))]
  for i in range(cfg.num_hidden_layers):
    for hf_name, sub_path, transpose in _LAYER_TENSORS:
      if cfg.scan_layers:
        path, layer = ("layers", *sub_path), i
      else:
        path, layer = ("layers", i, *sub_path), None
      specs.append(TensorSpec(f"model.layers.{i}.{hf_name}", path, layer, transpose, layer_shapes[hf_name]))
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), None, False, (D,)))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, True, (V, D)))
  return specs


# ----------------------------------------------------------------------------- configs


def _require(hf: dict, key: str):
  if hf.get(key) is None:
    raise ValueError(f"HF config lacks {key!r}")
  return hf[key]


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
  """``(rope_theta, rope_scaling)`` from either transformers 5's ``rope_parameters`` or the older fields."""
  params = hf.get("rope_parameters")
  if params is not None and set(params) and all(isinstance(v, dict) for v in params.values()):
    raise ValueError("HF config: per-layer-type rope_parameters are not supported for Llama")
  if params is None:
    params = dict(hf.get("rope_scaling") or {})
  else:
    params = dict(params)
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"HF config: unsupported RoPE type {rope_type!r} (only 'default' and 'llama3')")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"HF config: partial_rotary_factor {params['partial_rotary_factor']} is not supported")
  if rope_type == "default":
    return float(theta), None
  return float(theta), {**params, "rope_type": "llama3"}


def _dtype_from_hf(hf: dict):
  name = hf.get("dtype") or hf.get("torch_dtype")
  if not isinstance(name, str) or name == "auto":
    return jnp.float32
  return jnp.dtype(name.removeprefix("torch."))


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """A :class:`LlamaConfig` from a HF ``config.json`` dict; refuses what the model cannot express."""
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"HF config: model_type {hf['model_type']!r} is not 'llama'")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"HF config: hidden_act {act!r} is not supported (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise ValueError(f"HF config: {key}=true is not supported (the model has no biases)")
  theta, scaling = _rope_from_hf(hf)
  heads = _require(hf, "num_attention_heads")
  fields = dict(
      vocab_size=_require(hf, "vocab_size"),
      hidden_size=_require(hf, "hidden_size"),
      intermediate_size=_require(hf, "intermediate_size"),
      num_hidden_layers=_require(hf, "num_hidden_layers"),
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  fields.update(overrides)
  return LlamaConfig(**fields)


def config_to_hf(cfg: LlamaConfig, dtype=None) -> dict:
  """A HF ``config.json`` dict for ``cfg`` (read by transformers 4.x and 5.x)."""
  dtype_name = jnp.dtype(cfg.param_dtype if dtype is None else dtype).name
  rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
  if cfg.rope_scaling is not None:
    rope_parameters.update(cfg.rope_scaling)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "initializer_range": 0.02,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "use_cache": True,
      # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
      "rope_parameters": rope_parameters,
      "rope_theta": float(cfg.rope_theta),
      "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
      "dtype": dtype_name,
      "torch_dtype": dtype_name,
  }


# ----------------------------------------------------------------------------- reading


def _read_raw(filename: str, name: str) -> np.ndarray:
  """One tensor of a safetensors file via a memory map (for safetensors without numpy bf16)."""
  with open(filename, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  info = header[name]
  start, end = info["data_offsets"]
  dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
  return np.memmap(filename, dtype=dtype, mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))


class _Checkpoint:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    self.path, self._stack, self._handles = path, stack, {}
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      try:
        with open(index) as f:
          self.files = dict(json.load(f)["weight_map"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
      self.files = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
    else:
      raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

  def _handle(self, file: str):
    if file not in self._handles:
      filename = os.path.join(self.path, file)
      try:
        self._handles[file] = self._stack.enter_context(safe_open(filename, framework="numpy"))
      except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{filename} is not a readable safetensors file ({e})") from None
    return self._handles[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    file = self.files[name]
    try:
      return self._handle(file).get_tensor(name)
    except (TypeError, ValueError):  # older safetensors: no bf16 in numpy
      return _read_raw(os.path.join(self.path, file), name)


def _load_json(path: str, name: str) -> dict:
  with open(os.path.join(path, name)) as f:
    return json.load(f)


def _path_key(keypath) -> tuple:
  keys = []
  for k in keypath:
    key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    keys.append(key)
  if keys and keys[-1] == "value":  # Flax NNX variables flatten to their value.
    keys = keys[:-1]
  return tuple(keys)


def _check_names(ckpt: _Checkpoint, specs: list[TensorSpec], cfg: LlamaConfig):
  expected = {s.name for s in specs}
  present = set(ckpt.files)
  missing = sorted(expected - present)
  unexpected = sorted(n for n in present - expected
                      if not _IGNORED.search(n) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  problems = []
  if missing:
    problems.append(f"missing tensors {missing}")
  if unexpected:
    problems.append(f"unexpected tensors {unexpected}")
  for s in specs:
    if s.name in present and ckpt.shape(s.name) != s.hf_shape:
      problems.append(f"tensor {s.name!r} has shape {ckpt.shape(s.name)}, expected {s.hf_shape}")
  if problems:
    raise ValueError(f"{ckpt.path}: checkpoint does not match the config: " + "; ".join(problems))


def _to_flax(x: np.ndarray, transpose: bool, dtype) -> np.ndarray:
  return np.asarray(x.T if transpose else x).astype(dtype, copy=False)


def from_hf(path, *, dtype=None, param_dtype=None, **config_overrides) -> Llama:
  """Load a local HF Llama checkpoint directory into a :class:`Llama`.

  Args:
    path: a directory with ``config.json`` and ``model.safetensors`` or
      ``model-0000x-of-0000y.safetensors`` shards with
      ``model.safetensors.index.json``.
    dtype: compute dtype (default: ``param_dtype``).
    param_dtype: parameter dtype (default: the checkpoint's ``dtype`` /
      ``torch_dtype``, else float32).
    **config_overrides: other :class:`LlamaConfig` fields, e.g.
      ``scan_layers=True``, ``remat=True``.

  Raises:
    ValueError: an unsupported config, a missing, unexpected or mis-shaped
      tensor, or a damaged safetensors file or index (named in the message).
    FileNotFoundError: no ``config.json``, or no safetensors in ``path``.
  """
  path = os.fspath(path)
  hf = _load_json(path, "config.json")
  param_dtype = _dtype_from_hf(hf) if param_dtype is None else jnp.dtype(param_dtype)
  dtype = param_dtype if dtype is None else dtype
  cfg = config_from_hf(hf, param_dtype=param_dtype, dtype=dtype, **config_overrides)
  specs = hf_tensor_specs(cfg)

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  keyed, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  slots = {_path_key(k): i for i, (k, _) in enumerate(keyed)}
  by_path: dict[tuple, list[TensorSpec]] = {}
  for s in specs:
    by_path.setdefault(s.path, []).append(s)
  if set(by_path) != set(slots):
    raise AssertionError(f"internal: HF mapping {sorted(by_path)} does not cover the model's {sorted(slots)}")

  leaves = [None] * len(keyed)
  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(path, stack)
    _check_names(ckpt, specs, cfg)
    for param_path, group in by_path.items():
      target = keyed[slots[param_path]][1]
      if group[0].layer is None:
        host = _to_flax(ckpt.get(group[0].name), group[0].transpose, target.dtype)
      else:  # scan_layers: fill the stacked array layer by layer.
        host = np.empty(target.shape, target.dtype)
        for s in group:
          host[s.layer] = _to_flax(ckpt.get(s.name), s.transpose, target.dtype)
      if host.shape != target.shape:
        raise AssertionError(f"internal: {param_path} converted to {host.shape}, model expects {target.shape}")
      leaves[slots[param_path]] = jax.device_put(host, getattr(target, "sharding", None))
      del host
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# ----------------------------------------------------------------------------- writing


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
  if not m:
    raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. 5GB, 500MB or an int of bytes)")
  number, unit = float(m.group(1)), m.group(2)
  base = 1024 if "I" in unit else 1000
  return int(number * base ** "BKMGT".index(unit[0]))


def _get_param(flat_params: dict, spec: TensorSpec):
  value = flat_params[spec.path]
  return value if spec.layer is None else value[spec.layer]


def _shard_plan(specs: list[TensorSpec], itemsize: int, limit: int) -> list[list[TensorSpec]]:
  shards, current, size = [], [], 0
  for s in specs:
    nbytes = math.prod(s.hf_shape) * itemsize
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append(s)
    size += nbytes
  if current:
    shards.append(current)
  return shards


def _host_tensor(params: dict, spec: TensorSpec, dtype) -> np.ndarray:
  x = np.asarray(jax.device_get(_get_param(params, spec)))
  return np.ascontiguousarray(x.T if spec.transpose else x).astype(dtype, copy=False)


def _write_safetensors(filename: str, params: dict, shard: list[TensorSpec], dtype: np.dtype) -> None:
  """Write one safetensors file tensor by tensor: the header is known from the shapes.

  Unlike ``safetensors.numpy.save_file`` this never holds more than one
  tensor of the shard on the host.
  """
  code = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[dtype.type]
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for s in shard:
    nbytes = math.prod(s.hf_shape) * dtype.itemsize
    header[s.name] = {"dtype": code, "shape": list(s.hf_shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned, as safetensors writes it
  with open(filename, "wb") as f:
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for s in shard:
      x = _host_tensor(params, s, dtype)
      if x.shape != s.hf_shape:
        raise AssertionError(f"internal: {s.name} has shape {x.shape}, expected {s.hf_shape}")
      x.tofile(f)
      del x


def check_export_dir(path) -> None:
  """Raise ``ValueError`` naming ``path`` unless :func:`to_hf` may write there.

  An export replaces an earlier export's files; it never overwrites a ``config.json`` that is not a
  transformers model's (a training run's workdir, say) and never writes where a file is.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{path!r} exists and is not a directory")
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path) as f:
        existing = json.load(f)
    except (OSError, ValueError):
      existing = None
    if not isinstance(existing, dict) or "model_type" not in existing:
      raise ValueError(f"{path!r} holds a config.json that is not a transformers model's (a training run's "
                       f"workdir?); export to a new or empty directory")


def to_hf(model: Llama, path, *, tokenizer: Any = None, max_shard_size: int | str = "5GB", dtype=None) -> None:
  """Write ``model`` as a HF ``LlamaForCausalLM`` checkpoint directory.

  Args:
    model: the model.
    path: output directory (created if needed).
    tokenizer: optional HF tokenizer, saved alongside (and its bos/eos/pad
      ids written to the config).
    max_shard_size: bytes (int) or a string like ``'5GB'``; above it the
      weights are split into ``model-0000x-of-0000y.safetensors`` with
      ``model.safetensors.index.json``.
    dtype: dtype of the saved tensors (default: the parameters' dtype).

  Raises:
    ValueError: ``path`` is a file, or holds a ``config.json`` that is not a transformers model's
      (:func:`check_export_dir`); nothing is written.
  """
  path = os.fspath(path)
  check_export_dir(path)
  os.makedirs(path, exist_ok=True)
  cfg = model.config
  dtype = np.dtype(cfg.param_dtype if dtype is None else jnp.dtype(dtype))
  hf_config = config_to_hf(cfg, dtype)
  if tokenizer is not None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, key, None) is not None:
        hf_config[key] = getattr(tokenizer, key)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)

  keyed, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
  params = {_path_key(k): v for k, v in keyed}
  specs = hf_tensor_specs(cfg)
  shards = _shard_plan(specs, dtype.itemsize, _parse_size(max_shard_size))
  for stale in os.listdir(path):  # weights of an earlier export would confuse loaders
    if stale in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", stale):
      os.remove(os.path.join(path, stale))
  weight_map = {}
  for i, shard in enumerate(shards):
    file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_safetensors(os.path.join(path, file), params, shard, dtype)
    weight_map.update({s.name: file for s in shard})
  if len(shards) > 1:
    total = sum(math.prod(s.hf_shape) for s in specs) * dtype.itemsize
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
