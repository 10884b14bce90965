"""The train / validation split, decided by each document's content, and the fingerprint that names a split.

A document is in validation iff ``sha256(text) / 2**64 < validation_fraction``: no random state, and
duplicates land on the same side. If that leaves validation empty, the document with the smallest hash moves
there (the largest moves to train if train is empty); a corpus of one document is cut at the line nearest
``1 - validation_fraction`` of its length.
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
  return int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big") / 2.0**64


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
  """One side of a corpus's split, read on demand: the documents whose ``in_validation_D`` is ``validation``."""

  corpus: Corpus
  in_validation_D: np.ndarray
  validation: bool

  def __iter__(self) -> Iterator[str]:
    size, count = self.in_validation_D.size, 0
    for document in self.corpus:
      if count < size and self.in_validation_D[count] == self.validation:
        yield document
      count += 1
      if count > size:
        break
    if count != size:  # each pass must read the documents the split was made from (a file rewritten meanwhile)
      raise ValueError(f"the corpus changed while it was read: its documents are no longer the {size} it was split "
                       "into; start again")

  def __len__(self) -> int:
    return int(np.count_nonzero(self.in_validation_D == self.validation))


class Splits(NamedTuple):
  """A corpus split (each side a :class:`Split`, or a list for a corpus of one document) and its rows
  without text."""

  train: Split | list[str]
  val: Split | list[str]
  skipped: int


def split_corpus(corpus: Corpus, validation_fraction: float) -> Splits:
  """The corpus's split, from one pass that hashes each document (8 bytes per document are kept)."""
  hashes, skipped = array.array("d"), 0
  for document in corpus.rows():
    if document is None:
      skipped += 1
    else:
      hashes.append(document_hash(document) if validation_fraction > 0 else 1.0)
  if len(hashes) == 1 and validation_fraction > 0:
    return Splits(*cut_document(next(iter(corpus)), validation_fraction), skipped)
  hashes_D = np.frombuffer(hashes, np.float64) if hashes else np.zeros(0)
  in_validation_D = validation_mask(hashes_D, validation_fraction) if hashes_D.size else hashes_D < 0
  return Splits(Split(corpus, in_validation_D, False), Split(corpus, in_validation_D, True), skipped)


def fingerprint(documents: Iterable[str]) -> str:
  """sha256 over the documents and their boundaries."""
  h = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)
  return h.hexdigest()
