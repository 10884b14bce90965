"""The token cache: each split's documents encoded once, kept in ``workdir/data_cache/<key>/``.

A cache directory holds ``{train,val}_{tokens,offsets}.npy`` (document ``d`` of a split is
``tokens_N[offsets_D1[d]:offsets_D1[d + 1]]``: its tokens without special tokens, then eos) and ``meta.json``
with its key and token counts. The key hashes the splits' contents and the tokenizer. A cache is written to a
temporary directory and renamed; the tokens are written chunk after chunk, never whole in memory; it is
reloaded memory-mapped and checked against ``meta.json`` (a truncated or corrupt file is refused, naming it
and the directory to delete).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import time
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np

from galore_jax.train import workdir as workdir_lib
from galore_jax.train.data.spec import one_line
from galore_jax.train.data.tokenizer import tokenizer_fingerprint

CACHE_VERSION = 1
DOCUMENTS_PER_ENCODE = 256
PROGRESS_EVERY_S = 30.0  # between the lines a long encoding prints
SPLIT_NAMES = {"train": "the training split", "val": "the validation split"}


def encoded_chunks(tokenizer, documents: Iterable[str], eos_id: int,
                   chunk: int = DOCUMENTS_PER_ENCODE) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(tokens int32, lengths_D int64)`` per ``chunk`` documents, each encoded without special tokens, + eos."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  documents = iter(documents)
  while batch := list(itertools.islice(documents, chunk)):
    if backend is not None:
      ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
    else:
      ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    lengths_D = np.array([len(doc_ids) + 1 for doc_ids in ids], np.int64)
    tokens = np.full(int(lengths_D.sum()), eos_id, np.int32)
    for doc_ids, end in zip(ids, np.cumsum(lengths_D)):
      tokens[end - len(doc_ids) - 1:end - 1] = doc_ids
    yield tokens, lengths_D


def _offsets(lengths: Sequence[np.ndarray]) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.concatenate([np.zeros(0, np.int64), *lengths]))]).astype(np.int64)


def joined(chunks: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens_N int32, offsets_D1 int64)`` of encoded chunks: document ``d`` is
  ``tokens_N[offsets_D1[d]:offsets_D1[d + 1]]``."""
  tokens_N = np.concatenate([np.zeros(0, np.int32)] + [tokens for tokens, _ in chunks])
  return tokens_N, _offsets([lengths for _, lengths in chunks])


def tokenize_documents(tokenizer, documents: Iterable[str], eos_id: int,
                       chunk: int = DOCUMENTS_PER_ENCODE) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens_N int32, offsets_D1 int64)`` in memory (:func:`joined`): documents encoded without special tokens,
  each + eos."""
  return joined(list(encoded_chunks(tokenizer, documents, eos_id, chunk)))


def _npy_header(size: int) -> bytes:
  """The header ``np.save`` writes for an int32 vector of ``size`` (128 bytes for any size)."""
  f = io.BytesIO()
  np.lib.format.write_array_header_1_0(f, {**np.lib.format.header_data_from_array_1_0(np.zeros(0, np.int32)),
                                           "shape": (size,)})
  return f.getvalue()


def save_split(directory: str, name: str, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
  """``name_tokens.npy`` and ``name_offsets.npy`` in ``directory`` from encoded chunks; the number of tokens.

  The tokens go to the file as they come, behind a header whose size is filled in at the end: the files are
  byte for byte what ``np.save`` writes, and one chunk at a time is in memory.
  """
  lengths, size = [], 0
  with open(os.path.join(directory, f"{name}_tokens.npy"), "wb") as f:
    f.write(_npy_header(0))
    for tokens, lengths_D in chunks:
      f.write(tokens.astype("<i4", copy=False).tobytes())
      lengths.append(lengths_D)
      size += tokens.size
    header = _npy_header(size)
    if len(header) != len(_npy_header(0)):  # numpy pads the header so that it can be rewritten in place
      raise RuntimeError(f"this numpy's .npy header for {size} tokens is longer than for none")
    f.seek(0)
    f.write(header)
  np.save(os.path.join(directory, f"{name}_offsets.npy"), _offsets(lengths))
  return size


def cache_key(tokenizer, fingerprints: dict[str, str]) -> dict[str, Any]:
  """What a token cache holds: the splits (by their :func:`~galore_jax.train.data.split.fingerprint`) encoded by
  ``tokenizer``."""
  return {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "splits": dict(sorted(
      fingerprints.items()))}


def token_cache_dir(cache_root: str, key: dict[str, Any]) -> str:
  """Where ``cached_tokens`` keeps the cache of ``key`` (:func:`cache_key`): ``cache_root/<hash of key>/``; it
  holds the tokens once its ``meta.json`` exists."""
  return os.path.join(cache_root, hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20])


def reported(chunks: Iterable[tuple[np.ndarray, np.ndarray]], what: str, documents: int,
             say: Callable[[str], None]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``chunks`` as they come, with a line to ``say`` every :data:`PROGRESS_EVERY_S` seconds and one at the end."""
  start = last = time.monotonic()
  done = tokens = 0
  for tokens_C, lengths_D in chunks:
    yield tokens_C, lengths_D
    done, tokens, now = done + lengths_D.size, tokens + tokens_C.size, time.monotonic()
    if now - last >= PROGRESS_EVERY_S and done < documents:
      say(f"data: encoding {what}: {done:,} of {documents:,} documents, {tokens:,} tokens, {now - start:.0f} s")
      last = now
  say(f"data: encoded {what}: {done:,} documents, {tokens:,} tokens in {time.monotonic() - start:.0f} s")


def cached_tokens(directory: str, key: dict[str, Any], tokenizer, eos_id: int, splits: dict[str, Collection[str]],
                  say: Callable[[str], None] = lambda line: None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``tokenize_documents`` of each split, cached in ``directory`` (:func:`token_cache_dir` of ``key``) and loaded
  from it; ``say`` gets a progress line every :data:`PROGRESS_EVERY_S` seconds of encoding."""
  if not os.path.isfile(os.path.join(directory, "meta.json")):

    def write(tmp):
      counts = {name: save_split(tmp, name, reported(encoded_chunks(tokenizer, docs, eos_id),
                                                     SPLIT_NAMES.get(name, name), len(docs), say))
                for name, docs in splits.items()}
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"key": key, "tokens": counts}, f)

    workdir_lib.write_dir_atomic(directory, write, "meta.json")
  return load_token_cache(directory, splits)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class CorruptCache(ValueError):
  """A token-cache file that cannot be read or does not match its ``meta.json``."""


def load_token_cache(directory: str, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The cached ``(tokens_N, offsets_D1)`` of each split, checked against ``meta.json``'s token counts.

  A truncated, missing or inconsistent file raises :class:`CorruptCache` naming it and saying to delete
  ``directory`` (a cache: the next run rebuilds it).
  """
  def corrupt(path, reason):
    return CorruptCache(f"token cache file {path!r} is truncated or corrupt ({reason}); delete the directory "
                        f"{directory!r} (a cache: the next run rebuilds it)")

  def read(path, reader):
    try:
      return reader(path)
    except (ValueError, OSError, EOFError) as e:  # np.load / json raise these for short or garbled files
      raise corrupt(path, one_line(e)) from None

  meta_path = os.path.join(directory, "meta.json")
  counts = read(meta_path, read_json)
  arrays = {}
  for name in names:
    tokens_path, offsets_path = (os.path.join(directory, f"{name}_{kind}.npy") for kind in ("tokens", "offsets"))
    tokens_N = read(tokens_path, lambda p: np.load(p, mmap_mode="r"))
    offsets_D1 = read(offsets_path, lambda p: np.load(p, mmap_mode="r"))
    expected = counts.get("tokens", {}).get(name) if isinstance(counts, dict) else None
    if tokens_N.ndim != 1 or tokens_N.size != expected:
      raise corrupt(tokens_path, f"{tokens_N.size} tokens, {meta_path!r} records {expected}")
    if offsets_D1.ndim != 1 or offsets_D1.size == 0 or offsets_D1[0] != 0 or offsets_D1[-1] != tokens_N.size:
      raise corrupt(offsets_path, f"its document offsets do not span the {tokens_N.size} tokens")
    arrays[name] = (tokens_N, offsets_D1)
  return arrays
