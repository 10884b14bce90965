"""The text ``eval.py`` scores a checkpoint on, read from a training run without writing to its workdir.

By default it is the run's validation split, rebuilt from the run's saved ``data`` config (corpus, caps,
split rule), so the loss equals the ``eval_loss`` the run logged. The documents are encoded by the run's own
tokenizer, whose ids the checkpoints hold: ``data.tokenizer`` (the workdir's copy of it, see
:mod:`galore_jax.train.base_model`) or the one the run trained into ``workdir/tokenizer``; never a new one.
The tokens come from the run's token cache when it holds this split (without reading the corpus when it is
unchanged since the run recorded it, see :mod:`galore_jax.train.data`), otherwise they are encoded in memory.

``data_path`` replaces the run's corpus (one that moved, or held-out text; the run's ``text_field`` and caps
apply unless ``text_field`` is given) and ``split="all"`` scores every document instead of the split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np

from galore_jax.train import data

SPLITS = ("validation", "all")


class EvalData(NamedTuple):
  """The tokenizer and the batches to score, with what they hold (for the report)."""

  tokenizer: Any
  eos_id: int
  batches: list[dict[str, np.ndarray]]
  source: str  # "the validation split of data.path '...'"
  documents: int
  tokens: int
  rows: int


def run_tokenizer(spec: data.DataSpec, workdir: str, vocab_size: int):
  """The tokenizer whose ids the run's checkpoints hold; ``ValueError`` naming it when it is gone."""
  if spec.tokenizer is not None:
    return data.checked_tokenizer(data.load_tokenizer(spec.tokenizer), spec.tokenizer, vocab_size)
  directory = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(directory):
    raise ValueError(f"workdir {workdir!r} has no tokenizer/: the run trained its tokenizer there and its checkpoints "
                     "hold that tokenizer's ids, so no other can stand in")
  return data.checked_tokenizer(data.load_tokenizer(directory, "the run's trained tokenizer"), directory, vocab_size)


def _documents(spec: data.DataSpec, from_flag: bool) -> list[str]:
  """The corpus's documents; its errors name what eval.py's user can change (the loader names config keys)."""
  try:
    return data.corpus_documents(spec).documents
  except ValueError as e:
    message = str(e)
  if from_flag:
    message = message.replace("data.path", "--data_path", 1).replace("data.text_field", "--text_field", 1)
  elif spec.path is not None and not os.path.exists(spec.path):
    message += "; if the corpus moved, eval.py --data_path names where it is now"
  raise ValueError(message)


def _tokens(spec, workdir, tokenizer, vocab_size, split, from_flag) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens_N, offsets_D1)`` of the text to score. The validation split comes from the run's token cache when
  it holds it (read, never written): without reading the corpus when a start recorded the corpus's state, else
  after reading and splitting it. Anything else is encoded in memory."""
  cache_root = os.path.join(workdir, "data_cache")
  if split == "validation":
    state = data.corpus_state(spec, data.corpus_files(spec.path), tokenizer, vocab_size)
    recorded = data.recorded_cache(cache_root, state)
    if recorded is not None:
      return data.load_token_cache(recorded[0], ["val"])["val"]
  documents = _documents(spec, from_flag)
  if not documents:
    raise ValueError(f"{_corpus_name(spec, from_flag)} has no text (data.text_field {spec.text_field!r})")
  if split == "validation":
    train_docs, documents = data.split_documents(documents, spec.validation_fraction)
    directory = data.token_cache_dir(cache_root, tokenizer, {"train": train_docs, "val": documents})
    if os.path.isfile(os.path.join(directory, "meta.json")):
      return data.load_token_cache(directory, ["val"])["val"]
  return data.tokenize_documents(tokenizer, documents, data.special_ids(tokenizer)[1])


def _corpus_name(spec: data.DataSpec, from_flag: bool) -> str:
  return f"{'--data_path' if from_flag else 'data.path'} {spec.path!r}" if spec.path else "the embedded corpus"


def build_eval_data(data_config: Any, *, workdir: str, vocab_size: int, batch_size: int, batches: int | None,
                    data_path: str | None = None, split: str | None = None, text_field: str | None = None
                    ) -> EvalData:
  """The run's tokenizer and the batches of the text to score; bad input raises a one-line ``ValueError``.

  Args:
    data_config: the run's ``data`` config section.
    workdir: the run's workdir (read only).
    vocab_size: the model's vocabulary.
    batch_size: rows per batch.
    batches: how many batches, the first ones in order (None: every row).
    data_path: a corpus to score instead of the run's ``data.path``.
    split: ``"validation"`` (the run's rule on the corpus's documents) or ``"all"``; None: ``"all"`` with
      ``data_path``, else ``"validation"``.
    text_field: the field of json/parquet rows that holds the text (None: the run's ``data.text_field``).
  """
  split = split or ("all" if data_path else "validation")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
  if batch_size <= 0 or (batches is not None and batches <= 0):
    raise ValueError(f"batch_size and batches must be positive, got {batch_size!r} and {batches!r}")
  spec = data.data_spec(data_config)
  spec = dataclasses.replace(spec, path=data_path or spec.path, text_field=text_field or spec.text_field)
  tokenizer = run_tokenizer(spec, workdir, vocab_size)
  pad_id, eos_id, _ = data.special_ids(tokenizer)
  tokens_N, offsets_D1 = _tokens(spec, workdir, tokenizer, vocab_size, split, from_flag=bool(data_path))
  rows = data.Rows(tokens_N, offsets_D1, spec.seq_len, spec.packing, pad_id)
  return EvalData(tokenizer, eos_id, data.eval_batch_list(rows, batch_size, batches),
                  source=(f"{'the validation split' if split == 'validation' else 'all'} of "
                          f"{_corpus_name(spec, bool(data_path))}"),
                  documents=len(offsets_D1) - 1, tokens=int(tokens_N.size), rows=len(rows))
