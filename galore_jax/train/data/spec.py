"""The ``data`` section of a run's config, checked once: :class:`DataSpec`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# A trained tokenizer learns from a sample of at most this much of the training split: its time and memory stop
# growing with the corpus, and a 32k BPE learnt from a gigabyte compresses the rest as well (docs/training.md).
DEFAULT_TOKENIZER_TRAIN_BYTES = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The validated ``data`` section of a config."""

  path: str | None
  tokenizer: str | None
  seq_len: int
  packing: bool
  validation_fraction: float
  max_documents: int | None
  max_bytes: int | None
  text_field: str
  tokenizer_train_bytes: int | None = DEFAULT_TOKENIZER_TRAIN_BYTES


def _lookup(config: Any, key: str, default: Any) -> Any:
  """``config.key`` for a ConfigDict, a dict or any object; ``default`` when absent."""
  if isinstance(config, dict):
    return config.get(key, default)
  try:
    return config[key] if key in config else default  # ConfigDict (also FrozenConfigDict)
  except TypeError:
    return getattr(config, key, default)


def _get(config: Any, key: str, default: Any) -> Any:
  """``config.key``; ``default`` when absent or None."""
  value = _lookup(config, key, default)
  return default if value is None else value


def _cap(data_config: Any, name: str, default: int | None) -> int | None:
  """A cap: a positive integer, or None for none (0 too: the command line cannot spell None for an integer)."""
  value = _lookup(data_config, name, default)
  if value is None:
    return None
  integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
  if isinstance(value, bool) or not integral or value < 0:
    raise ValueError(f"data.{name} must be a positive integer, or 0 or None for no cap, got {value!r}")
  return int(value) or None


def data_spec(data_config: Any) -> DataSpec:
  """Read and check ``data_config``; a bad value raises ``ValueError`` naming it."""
  seq_len = _get(data_config, "seq_len", 0)
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
    raise ValueError(f"data.seq_len must be a positive integer, got {seq_len!r}")
  fraction = _get(data_config, "validation_fraction", 0.05)
  if not 0.0 <= float(fraction) < 1.0:
    raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
  caps = {name: _cap(data_config, name, None) for name in ("max_documents", "max_bytes")}
  caps["tokenizer_train_bytes"] = _cap(data_config, "tokenizer_train_bytes", DEFAULT_TOKENIZER_TRAIN_BYTES)
  text_field = _get(data_config, "text_field", "text")
  if not isinstance(text_field, str) or not text_field:
    raise ValueError(f"data.text_field must be a non-empty string, got {text_field!r}")
  path, tokenizer = _get(data_config, "path", None), _get(data_config, "tokenizer", None)
  return DataSpec(path=None if path in (None, "") else str(path),
                  tokenizer=None if tokenizer in (None, "") else str(tokenizer), seq_len=int(seq_len),
                  packing=bool(_get(data_config, "packing", True)), validation_fraction=float(fraction),
                  text_field=text_field, **caps)


def corpus_name(spec: DataSpec) -> str:
  """How messages name the corpus: ``data.path '...'`` or ``the embedded corpus``."""
  return "the embedded corpus" if spec.path is None else f"data.path {spec.path!r}"


def text_size(n_bytes: int) -> str:
  """``n_bytes`` of text for messages: ``1.25 GB``, ``3.4 MB`` or ``12 kB``."""
  if n_bytes >= 1e9:
    return f"{n_bytes / 1e9:,.2f} GB"
  return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"


def one_line(error: BaseException) -> str:
  """``Type: first line of the message``, for the one-line errors a bad input gets."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"
