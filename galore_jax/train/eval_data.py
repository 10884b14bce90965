"""The text ``eval.py`` scores a checkpoint on, read from a training run without writing to its workdir.

By default it is the run's validation split, rebuilt from the run's saved ``data`` config (corpus, caps,
split rule), so the loss equals the ``eval_loss`` the run logged. The documents are encoded by the run's own
tokenizer, whose ids the checkpoints hold: ``data.tokenizer`` (the workdir's copy of it, see
:mod:`galore_jax.train.base_model`) or the one the run trained into ``workdir/tokenizer``; never a new one.
The tokens come from the run's token cache when it holds this split (without reading the corpus when it is
unchanged since the run recorded it, see :mod:`galore_jax.train.data.corpus_state`), otherwise they are
encoded in memory.

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
  source: str  # "the validation split of data.path '...'", with the caps that cut it
  documents: int
  tokens: int
  rows: int
  skipped: int  # rows of the corpus without text, left out
  complete: bool  # documents, tokens and rows are the whole source's; False: the first ones, enough for the batches
  empty_because: str | None  # why no token is predicted, when none is


def run_tokenizer(spec: data.DataSpec, workdir: str, vocab_size: int):
  """The tokenizer whose ids the run's checkpoints hold; ``ValueError`` naming it when it is gone."""
  if spec.tokenizer is not None:
    return data.checked_tokenizer(data.load_tokenizer(spec.tokenizer), spec.tokenizer, vocab_size)
  directory = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(directory):
    raise ValueError(f"workdir {workdir!r} has no tokenizer/: the run trained its tokenizer there and its checkpoints "
                     "hold that tokenizer's ids, so no other can stand in")
  return data.checked_tokenizer(data.load_tokenizer(directory, "the run's trained tokenizer"), directory, vocab_size)


def _names(from_flag: bool) -> tuple[str, str]:
  """How the messages name the corpus path and its text field: eval.py's flags, or the run's config keys."""
  return ("--data_path", "--text_field") if from_flag else ("data.path", "data.text_field")


def _renamed(error: ValueError, spec: data.DataSpec, from_flag: bool) -> ValueError:
  """The corpus reader's error naming what eval.py's user can change (the reader names config keys)."""
  path_name, field_name = _names(from_flag)
  message = str(error).replace("data.path", path_name, 1).replace("data.text_field", field_name, 1)
  if not from_flag and spec.path is not None and not os.path.exists(spec.path):
    message += "; if the corpus moved, eval.py --data_path names where it is now"
  return ValueError(message)


def _no_text(spec: data.DataSpec, skipped: int) -> ValueError:
  rows = ("" if not skipped else
          f": {f'none of its {skipped} rows holds' if skipped > 1 else 'its one row holds no'} text "
          f"in data.text_field {spec.text_field!r}")
  return ValueError(f"data.path {spec.path!r} has no text{rows}")


class Scored(NamedTuple):
  """The tokens to score and how much of the source they are."""

  tokens_N: np.ndarray
  offsets_D1: np.ndarray
  skipped: int  # rows of the corpus read without text
  complete: bool  # every document of the source; False when the reading stopped once the batches were full


def _encoded(tokenizer, documents, spec: data.DataSpec, rows_wanted: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
  """``(tokens_N, offsets_D1, complete)``: the first of ``documents`` that fill ``rows_wanted`` rows exactly as
  the whole text would (None: all of them), encoded a chunk at a time. A packed row ``r`` ends at token
  ``(r + 1) * seq_len``; an unpacked row is a document with a target."""
  chunks, tokens, rows, exhausted = [], 0, 0, True
  documents = iter(documents)
  for tokens_C, lengths_D in data.encoded_chunks(tokenizer, documents, data.special_ids(tokenizer)[1]):
    chunks.append((tokens_C, lengths_D))
    tokens, rows = tokens + tokens_C.size, rows + int(np.count_nonzero(lengths_D > 1))
    if rows_wanted is not None and (tokens > rows_wanted * spec.seq_len if spec.packing else rows >= rows_wanted):
      exhausted = next(documents, None) is None  # one more document read (not encoded) tells
      break
  tokens_N, offsets_D1 = data.joined(chunks)
  read = offsets_D1.size - 1
  needed = read if rows_wanted is None else min(read, _documents_needed(offsets_D1, spec, rows_wanted))
  return tokens_N[:offsets_D1[needed]], offsets_D1[:needed + 1], exhausted and needed == read


def _documents_needed(offsets_D1: np.ndarray, spec: data.DataSpec, rows_wanted: int) -> int:
  """How many of the first documents the first ``rows_wanted`` rows are made of (all when they fall short)."""
  if spec.packing:  # the last row needed ends at token rows_wanted * seq_len
    return int(np.searchsorted(offsets_D1[1:], rows_wanted * spec.seq_len + 1)) + 1
  with_target_D = np.flatnonzero(np.diff(offsets_D1) > 1)
  return int(with_target_D[rows_wanted - 1]) + 1 if with_target_D.size >= rows_wanted else offsets_D1.size - 1


class _Reading:
  """A corpus's documents as they are read, with the count of rows without text read before each."""

  def __init__(self, corpus: data.Corpus):
    self.rows, self.skipped, self.skipped_before = corpus.rows(), 0, []

  def __iter__(self):
    for document in self.rows:
      if document is None:
        self.skipped += 1
      else:
        self.skipped_before.append(self.skipped)
        yield document


def _tokens(spec, workdir, tokenizer, vocab_size, split, from_flag, rows_wanted) -> Scored:
  """The tokens of the text to score. The validation split comes from the run's token cache when it holds it
  (read, never written): without reading the corpus when a start recorded the corpus's state, else after
  reading and splitting it. Anything else is encoded in memory, only as far as ``rows_wanted`` rows need."""
  cache_root = os.path.join(workdir, "data_cache")
  if split == "validation":
    state = data.corpus_state(spec, data.corpus_files(spec.path), tokenizer, vocab_size)
    recorded = data.recorded_cache(cache_root, state)
    if recorded is not None:
      directory, stats = recorded
      return Scored(*data.load_token_cache(directory, ["val"])["val"], int(stats.get("skipped_documents", 0)), True)
  try:
    with data.open_corpus(spec) as corpus:
      if split == "all":
        reading = _Reading(corpus)
        tokens_N, offsets_D1, complete = _encoded(tokenizer, reading, spec, rows_wanted)
        if offsets_D1.size == 1:
          raise _no_text(spec, reading.skipped)
        skipped = reading.skipped if complete else reading.skipped_before[offsets_D1.size - 2]  # before the last
        return Scored(tokens_N, offsets_D1, skipped, complete)
      train_docs, val_docs, skipped = data.split_corpus(corpus, spec.validation_fraction)
      if not train_docs and not val_docs:
        raise _no_text(spec, skipped)
      fingerprints = {"train": data.fingerprint(train_docs), "val": data.fingerprint(val_docs)}
      directory = data.token_cache_dir(cache_root, data.cache_key(tokenizer, fingerprints))
      if os.path.isfile(os.path.join(directory, "meta.json")):
        return Scored(*data.load_token_cache(directory, ["val"])["val"], skipped, True)
      tokens_N, offsets_D1, complete = _encoded(tokenizer, val_docs, spec, rows_wanted)
      return Scored(tokens_N, offsets_D1, skipped, complete)
  except data.CorruptCache:
    raise
  except ValueError as e:
    raise _renamed(e, spec, from_flag) from None


def _source(spec: data.DataSpec, split: str, from_flag: bool) -> str:
  """``the validation split of data.path '...'``, with the run's caps when they cut the text."""
  corpus = f"{_names(from_flag)[0]} {spec.path!r}" if spec.path else "the embedded corpus"
  caps = [f"data.{name} {value}" for name, value in (("max_documents", spec.max_documents),
                                                       ("max_bytes", spec.max_bytes)) if value]
  return (f"{'the validation split' if split == 'validation' else 'all'} of {corpus}"
          + (f" (cut by the run's {' and '.join(caps)})" if caps else ""))


def _empty_because(spec: data.DataSpec, split: str) -> str:
  if split == "all":
    return "its documents hold fewer than two tokens"
  if spec.validation_fraction == 0:
    return "the run's data.validation_fraction is 0; --split=all scores every document"
  return "its validation split is empty; --split=all scores every document"


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
  scored = _tokens(spec, workdir, tokenizer, vocab_size, split, bool(data_path),
                   rows_wanted=None if batches is None else batches * batch_size)
  rows = data.Rows(scored.tokens_N, scored.offsets_D1, spec.seq_len, spec.packing, pad_id)
  return EvalData(tokenizer, eos_id, data.eval_batch_list(rows, batch_size, batches),
                  source=_source(spec, split, bool(data_path)), documents=len(scored.offsets_D1) - 1,
                  tokens=int(scored.tokens_N.size), rows=len(rows), skipped=scored.skipped, complete=scored.complete,
                  empty_because=None if len(rows) else _empty_because(spec, split))
