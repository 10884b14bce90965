"""Later starts: a token cache records the state of the corpus it was built from, so that a start whose corpus
has not changed loads the cache without reading the corpus.

The state (``corpus_state.json`` in the cache directory) is every file under ``data.path`` with its size and
modification time, the settings that pick and split the documents, the tokenizer and the vocabulary. Any
change (a file touched, added or removed, another cap) means reading the corpus again, as a first start does.
As with ``make``, a file rewritten with the same size and an unchanged modification time goes unnoticed. The
embedded corpus has no state (it is small: always read again).
"""

from __future__ import annotations

import json
import os
from typing import Any

from galore_jax.train import workdir as workdir_lib
from galore_jax.train.data.spec import DataSpec
from galore_jax.train.data.token_cache import CACHE_VERSION, read_json
from galore_jax.train.data.tokenizer import tokenizer_fingerprint

CORPUS_STATE = "corpus_state.json"


def corpus_files(path: str | None) -> list[list[Any]] | None:
  """``[relative path, size, modification time]`` of every file under ``path`` (or of the file ``path``), taken
  before the corpus is read; None for the embedded corpus (``path`` None) or a file that cannot be listed."""
  if path is None:
    return None
  root = os.path.abspath(path)
  paths = [root] if os.path.isfile(root) else sorted(os.path.join(d, name) for d, _, names in os.walk(root)
                                                     for name in names)
  try:
    return [[os.path.relpath(p, root), st.st_size, st.st_mtime_ns] for p in paths for st in [os.stat(p)]]
  except OSError:
    return None


def corpus_state(spec: DataSpec, files: list[list[Any]] | None, tokenizer, vocab_size: int) -> dict[str, Any] | None:
  """What a token cache is built from, cheap to compare at a later start: the corpus's ``files``
  (:func:`corpus_files`), the settings that pick and split its documents, the tokenizer and the model's
  vocabulary. None when ``files`` is None."""
  if files is None:
    return None
  return {"version": CACHE_VERSION, "path": os.path.abspath(spec.path), "files": files,
          "text_field": spec.text_field, "max_documents": spec.max_documents, "max_bytes": spec.max_bytes,
          "validation_fraction": spec.validation_fraction, "tokenizer": tokenizer_fingerprint(tokenizer),
          "vocab_size": int(vocab_size)}


def recorded_cache(cache_root: str, state: dict[str, Any] | None) -> tuple[str, dict[str, int]] | None:
  """``(directory, stats)`` of the token cache that :func:`record_corpus_state` recorded for ``state``, if any."""
  if state is None or not os.path.isdir(cache_root):
    return None
  for name in sorted(os.listdir(cache_root)):
    directory = os.path.join(cache_root, name)
    try:
      recorded = read_json(os.path.join(directory, CORPUS_STATE))
    except (OSError, ValueError):
      continue
    if (isinstance(recorded, dict) and recorded.get("state") == state and isinstance(recorded.get("stats"), dict)
        and os.path.isfile(os.path.join(directory, "meta.json"))):
      return directory, recorded["stats"]
  return None


def record_corpus_state(directory: str, state: dict[str, Any] | None, stats: dict[str, int]) -> None:
  """Note in the token cache ``directory`` the corpus state it was built from, for :func:`recorded_cache`."""
  if state is not None:
    workdir_lib.write_text_atomic(os.path.join(directory, CORPUS_STATE), json.dumps({"state": state, "stats": stats}))
