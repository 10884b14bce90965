"""The data pipeline of ``train.py``: corpus → split → tokenizer → token cache → batches (:func:`build_data`).

Everything here runs on the host in numpy. One module per step, each with its decisions in its docstring:

* :mod:`.spec`: the ``data`` config section, checked once (:class:`DataSpec`).
* :mod:`.corpus`: the documents, read on demand and never all in memory. A ``.txt`` file is one document (code
  and prose keep their context); a ``.jsonl``/``.json``/``.parquet`` row or a ``save_to_disk`` row is one
  document (its ``text_field``); text and JSON files may be ``.gz``/``.bz2``/``.xz`` compressed, parquet files
  are read in place. Rows whose field is missing, not a string or only whitespace are left out and counted
  (``stats["skipped_documents"]``, which ``train.py`` prints at start-up: the rows read before a cap stops the
  reading). A folder is read recursively (hidden entries skipped), grouped by kind (text, json, parquet) and
  sorted by relative path within a kind. ``path=None`` is the embedded corpus: the Python standard library's
  own ``*.py`` sources, sorted by relative path, without test directories, site-packages, ``encodings`` tables
  and the machine-specific build files, identical on every machine with the same Python version. The caps
  ``max_documents`` then ``max_bytes`` (UTF-8) keep a prefix of the documents; the document that crosses
  ``max_bytes`` is cut to fit. A cap of 0 or None is none (but the embedded corpus stops at 8 MB).
* :mod:`.split`: train / validation by each document's content hash, no random state.
* :mod:`.tokenizer`: ``data.tokenizer``, or a byte-level BPE trained on at most ``tokenizer_train_bytes`` of
  the training split (a sample by content hash) and cached in ``workdir/tokenizer``. Each document is encoded
  without special tokens and gets ``eos`` appended.
* :mod:`.token_cache`: the encoded splits in ``workdir/data_cache/<key>/``, written chunk by chunk and
  reloaded memory-mapped; :mod:`.corpus_state` lets a later start on an unchanged corpus load them without
  reading the corpus.
* :mod:`.batches`: packed (or one-per-document) rows of ``seq_len + 1`` tokens, shuffled per epoch,
  resumable; the validation batches in order.

A first start passes over the corpus six times (split, fingerprints of both splits, tokenizer training,
encoding of both splits), each pass reading it again (memory-mapped arrow tables, parquet files in place):
its private host memory grows slowly with the corpus (0.64 GB for 1 GB of text; 0.71 GB for 3 GB with the
tokenizer on its 1 GB sample, 0.95 GB on the whole split; see
``docs/training.md``, "How much text it handles").
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np

from galore_jax.train.data.batches import Batches, Rows, eval_batch_list, segment_positions
from galore_jax.train.data.corpus import (DEFAULT_MAX_BYTES, Corpus, Documents, cap_documents, load_documents,
                                          open_corpus, open_files, stdlib_documents)
from galore_jax.train.data.corpus_state import (CORPUS_STATE, corpus_files, corpus_state, record_corpus_state,
                                                recorded_cache)
from galore_jax.train.data.spec import DataSpec, corpus_name, data_spec, text_size
from galore_jax.train.data.split import Split, Splits, document_hash, fingerprint, split_corpus, split_documents
from galore_jax.train.data.token_cache import (CorruptCache, cache_key, cached_tokens, encoded_chunks, joined,
                                               load_token_cache, token_cache_dir, tokenize_documents)
from galore_jax.train.data.tokenizer import (CORPUS_RECORD, SPECIAL_TOKENS, cached_tokenizer, checked_tokenizer,
                                             load_tokenizer, special_ids, tokenizer_fingerprint, train_tokenizer)

__all__ = [
    "Batches", "CORPUS_RECORD", "CORPUS_STATE", "Corpus", "CorruptCache", "DEFAULT_MAX_BYTES", "Data", "DataSpec",
    "Documents", "Rows", "SPECIAL_TOKENS", "Split", "Splits", "build_data", "cache_key", "cached_tokenizer",
    "cached_tokens", "cap_documents", "checked_tokenizer", "corpus_files", "corpus_name", "corpus_state",
    "data_spec", "document_hash", "encoded_chunks", "eval_batch_list", "fingerprint", "joined", "load_documents",
    "load_token_cache", "load_tokenizer", "open_corpus", "open_files", "record_corpus_state", "recorded_cache",
    "segment_positions", "special_ids", "split_corpus", "split_documents", "stdlib_documents", "text_size",
    "token_cache_dir", "tokenize_documents", "tokenizer_fingerprint", "train_tokenizer",
]


@dataclasses.dataclass
class Data:
  """What ``train.py`` / ``eval.py`` use: the tokenizer, the batches, special ids and sizes."""

  tokenizer: Any
  train: Batches
  eval_batches: list[dict[str, np.ndarray]]
  pad_id: int
  eos_id: int
  bos_id: int | None
  stats: dict[str, int]


def _recorded_start(spec: DataSpec, files, workdir: str, tokenizer, vocab_size: int):
  """``(tokenizer, token cache directory, document counts)`` when a token cache records this corpus state."""
  if tokenizer is None:  # trained by an earlier start, if the run has one
    trained = os.path.join(workdir, "tokenizer")
    if files is None or not os.path.isfile(os.path.join(trained, CORPUS_RECORD)):
      return None
    try:
      tokenizer = checked_tokenizer(load_tokenizer(trained), trained, vocab_size)
    except ValueError:
      return None  # reading the corpus again reports it, as a first start would
  found = recorded_cache(os.path.join(workdir, "data_cache"), corpus_state(spec, files, tokenizer, vocab_size))
  return None if found is None else (tokenizer, *found)


def _read_and_encode(spec: DataSpec, workdir: str, tokenizer, vocab_size: int, say: Callable[[str], None]):
  """``(tokenizer, token cache directory, document counts, arrays)``: the corpus read, split and encoded (the
  tokenizer trained first when the run has none), the tokens cached."""
  start = time.monotonic()
  say(f"data: reading {corpus_name(spec)} to split, encode and cache it (a later start on the unchanged corpus "
      "loads the cache)")
  with open_corpus(spec) as corpus:
    train_docs, val_docs, skipped = split_corpus(corpus, spec.validation_fraction)
    if not train_docs and not val_docs:
      raise ValueError(f"{corpus_name(spec)} has no text")
    if not train_docs or (spec.validation_fraction > 0 and not val_docs):
      raise ValueError(f"{corpus_name(spec)} leaves an empty split: {len(train_docs)} training and {len(val_docs)} "
                       f"validation documents (validation_fraction {spec.validation_fraction})")
    say(f"data: split in {time.monotonic() - start:.0f} s: {len(train_docs):,} training and {len(val_docs):,} "
        "validation documents")
    splits = {"train": train_docs, "val": val_docs}
    fingerprints = {name: fingerprint(docs) for name, docs in splits.items()}
    if tokenizer is None:
      trained = cached_tokenizer(workdir, train_docs, int(vocab_size), fingerprints["train"], say,
                                 spec.tokenizer_train_bytes)
      tokenizer = checked_tokenizer(trained, os.path.join(workdir, "tokenizer"), vocab_size)
    key = cache_key(tokenizer, fingerprints)
    directory = token_cache_dir(os.path.join(workdir, "data_cache"), key)
    arrays = cached_tokens(directory, key, tokenizer, special_ids(tokenizer)[1], splits, say)
  documents = {"train_documents": len(train_docs), "val_documents": len(val_docs), "skipped_documents": skipped,
               "train_bytes": train_docs.bytes, "val_bytes": val_docs.bytes}
  return tokenizer, directory, documents, arrays


def build_data(data_config: Any, *, workdir: str, vocab_size: int, batch_size: int, seed: int = 0,
               eval_batch_size: int | None = None, eval_batches: int | None = 8,
               progress: Callable[[str], None] | None = None) -> Data:
  """Corpus → split → tokenizer → cached tokens → ``Data``; bad input raises a one-line ``ValueError``.

  Args:
    data_config: the ``data`` config section (``path``, ``tokenizer``, ``seq_len``, ``packing``,
      ``validation_fraction``, ``max_documents``, ``max_bytes``, ``text_field``, ``tokenizer_train_bytes``;
      a cap of 0 or None is no cap).
    workdir: run directory; holds ``tokenizer/`` (when trained here) and ``data_cache/``.
    vocab_size: the model's vocabulary; the tokenizer may not exceed it.
    batch_size: rows per training batch.
    seed: shuffling seed.
    eval_batch_size: rows per validation batch (default ``batch_size``).
    eval_batches: number of validation batches (None: all validation rows).
    progress: gets a line per step of a first start (which can take minutes per GB of text) and every
      30 s of encoding; one line when a later start loads the token cache.
  """
  say = progress or (lambda line: None)
  spec = data_spec(data_config)
  if vocab_size is None or int(vocab_size) <= 0:
    raise ValueError(f"vocab_size must be positive, got {vocab_size!r}")
  if eval_batch_size is not None and eval_batch_size <= 0:
    raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size!r}")
  tokenizer = (None if spec.tokenizer is None else
               checked_tokenizer(load_tokenizer(spec.tokenizer), spec.tokenizer, vocab_size))
  files = corpus_files(spec.path)  # before reading: a file changed while it is read is not recorded as read
  recorded = _recorded_start(spec, files, workdir, tokenizer, vocab_size)
  if recorded is not None:  # the corpus has not changed since a start that recorded it: not read again
    tokenizer, directory, documents = recorded
    arrays = load_token_cache(directory, ["train", "val"])
    say(f"data: {corpus_name(spec)} is unchanged since its tokens were cached: loaded {directory}")
  else:
    tokenizer, directory, documents, arrays = _read_and_encode(spec, workdir, tokenizer, vocab_size, say)
    record_corpus_state(directory, corpus_state(spec, files, tokenizer, vocab_size), documents)
  pad_id, eos_id, bos_id = special_ids(tokenizer)
  train_rows = Rows(*arrays["train"], spec.seq_len, spec.packing, pad_id)
  val_rows = Rows(*arrays["val"], spec.seq_len, spec.packing, pad_id)
  if len(train_rows) == 0:
    raise ValueError(f"{corpus_name(spec)} has no training tokens to predict after tokenizing")
  stats = {**documents, "train_tokens": int(arrays["train"][0].size), "val_tokens": int(arrays["val"][0].size),
           "train_rows": len(train_rows), "val_rows": len(val_rows), "vocab_size": len(tokenizer)}
  return Data(tokenizer=tokenizer, train=Batches(train_rows, batch_size, seed),
              eval_batches=eval_batch_list(val_rows, eval_batch_size or batch_size, eval_batches),
              pad_id=pad_id, eos_id=eos_id, bos_id=bos_id, stats=stats)
