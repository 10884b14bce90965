"""The train / validation split, decided by each document's content, and the fingerprint that names a split.

A document is in validation iff ``sha256(text) / 2**64 < validation_fraction``: no random state, and
duplicates land on the same side. If that leaves validation empty, the document with the smallest hash moves
there (the largest moves to train if train is empty); a corpus of one document is cut at the line nearest
``1 - validation_fraction`` of its length.

The same hash samples a split (:meth:`Split.sample`: the tokenizer learns from at most
``data.tokenizer_train_bytes`` of the training split): the documents of lowest hash up to a byte budget.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from galore_jax.train.data.corpus import Corpus


def document_hash(document: str) -> float:
  """A document's place in [0, 1): the first 8 bytes of ``sha256(text)`` over 2**64."""
  return _bytes_hash(document.encode("utf-8"))


def _bytes_hash(data: bytes) -> float:
  return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0**64


def validation_mask(hashes_D: np.ndarray, validation_fraction: float) -> np.ndarray:
  """``in_validation_D`` for two or more documents with these hashes, by the rule above."""
  in_validation_D = hashes_D < validation_fraction
  if validation_fraction > 0 and not in_validation_D.any():
    in_validation_D[np.argmin(hashes_D)] = True
  if in_validation_D.all():
    in_validation_D[np.argmax(hashes_D)] = False
  return in_validation_D


def cut_document(document: str, validation_fraction: float) -> tuple[list[str], list[str]]:
  """``(train, validation)`` of a corpus of one document: cut at the line nearest the fraction."""
  cut = int(len(document) * (1.0 - validation_fraction))
  newline = document.rfind("\n", 0, cut)
  cut = newline + 1 if newline > 0 else cut
  return [t for t in [document[:cut]] if t.strip()], [t for t in [document[cut:]] if t.strip()]


def split_documents(documents: Sequence[str], validation_fraction: float) -> tuple[list[str], list[str]]:
  """``(train, validation)`` of documents in memory, order kept (as :func:`split_corpus`)."""
  documents = list(documents)
  if validation_fraction <= 0 or not documents:
    return documents, []
  if len(documents) == 1:
    return cut_document(documents[0], validation_fraction)
  in_validation_D = validation_mask(np.array([document_hash(d) for d in documents]), validation_fraction)
  return ([d for d, v in zip(documents, in_validation_D) if not v],
          [d for d, v in zip(documents, in_validation_D) if v])


@dataclasses.dataclass(frozen=True)
class Split:
  """Some documents of a corpus, read on demand in corpus order: those where ``chosen_D`` is True.

  ``hashes_D`` (:func:`document_hash`) and ``sizes_D`` (UTF-8 bytes) describe every document of the corpus, so
  that a split knows its size and can be sampled without reading the corpus.
  """

  corpus: Corpus
  chosen_D: np.ndarray
  hashes_D: np.ndarray
  sizes_D: np.ndarray

  @classmethod
  def of(cls, documents: Sequence[str]) -> Split:
    """All of ``documents`` (in memory) as a split."""
    documents = list(documents)
    return cls(Corpus(lambda: documents), np.ones(len(documents), bool),
               np.array([document_hash(d) for d in documents], np.float64),
               np.array([len(d.encode("utf-8")) for d in documents], np.int64))

  def __iter__(self) -> Iterator[str]:
    size, count = self.chosen_D.size, 0
    for document in self.corpus:
      if count < size and self.chosen_D[count]:
        yield document
      count += 1
      if count > size:
        break
    if count != size:  # each pass must read the documents the split was made from (a file rewritten meanwhile)
      raise ValueError(f"the corpus changed while it was read: its documents are no longer the {size} it was split "
                       "into; start again")

  def __len__(self) -> int:
    return int(np.count_nonzero(self.chosen_D))

  @property
  def bytes(self) -> int:
    """The UTF-8 size of its documents."""
    return int(self.sizes_D[self.chosen_D].sum())

  def sample(self, max_bytes: int | None) -> Split:
    """Its documents of lowest :func:`document_hash` whose sizes add up to at most ``max_bytes`` (at least one),
    in corpus order; itself when they all fit or ``max_bytes`` is None.

    The hash is uniform and independent of the order, so this is a uniform sample of the documents (of every
    file of a corpus, not its first ones) with no random state: the same documents give the same sample.
    """
    if max_bytes is None or self.bytes <= max_bytes:
      return self
    index = np.flatnonzero(self.chosen_D)
    by_hash = index[np.argsort(self.hashes_D[index], kind="stable")]
    kept = max(1, int(np.searchsorted(np.cumsum(self.sizes_D[by_hash]), max_bytes, side="right")))
    chosen_D = np.zeros_like(self.chosen_D)
    chosen_D[by_hash[:kept]] = True
    return dataclasses.replace(self, chosen_D=chosen_D)


class Splits(NamedTuple):
  """A corpus split into two :class:`Split` and its rows without text."""

  train: Split
  val: Split
  skipped: int


def split_corpus(corpus: Corpus, validation_fraction: float) -> Splits:
  """The corpus's split, from one pass that hashes each document (16 bytes per document are kept)."""
  hashes, sizes, skipped = array.array("d"), array.array("q"), 0
  for document in corpus.rows():
    if document is None:
      skipped += 1
      continue
    data = document.encode("utf-8")
    hashes.append(_bytes_hash(data))
    sizes.append(len(data))
  if len(hashes) == 1 and validation_fraction > 0:
    train, val = cut_document(next(iter(corpus)), validation_fraction)
    return Splits(Split.of(train), Split.of(val), skipped)
  hashes_D = np.frombuffer(hashes, np.float64) if hashes else np.zeros(0)
  sizes_D = np.frombuffer(sizes, np.int64) if sizes else np.zeros(0, np.int64)
  in_validation_D = validation_mask(hashes_D, validation_fraction) if hashes_D.size else hashes_D < 0
  return Splits(Split(corpus, ~in_validation_D, hashes_D, sizes_D), Split(corpus, in_validation_D, hashes_D, sizes_D),
                skipped)


def fingerprint(documents: Iterable[str]) -> str:
  """sha256 over the documents and their boundaries."""
  h = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)
  return h.hexdigest()
