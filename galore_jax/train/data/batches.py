"""Rows and batches of a split's tokens, on the host in numpy.

A batch is a dict of numpy arrays::

  inputs[B,S] int32, targets[B,S] int32, loss_mask[B,S] float32, segment_ids[B,S] int32, positions[B,S] int32

* **Rows.** ``packing=True``: the split's token stream is cut into rows of ``seq_len + 1`` tokens that
  overlap by one (row ``r`` = ``tokens[r*S : r*S + S + 1]``) so every token but the first is a target
  exactly once; the last, shorter row is padded. Segment ids number the documents inside a row from 1
  (0 = padding); positions restart at 0 at each segment, as ``llama.segment_positions`` does. The target
  after a document's ``eos`` is the next document's first token and is trained on (attention never
  crosses the boundary). ``packing=False``: one row per document, truncated to ``seq_len + 1`` tokens
  and padded with ``pad``; segment id 1 on real tokens. ``loss_mask`` is 1 exactly where the target
  is a real token.
* **Order.** Training rows are shuffled per epoch with ``np.random.default_rng((seed, epoch))``; epochs
  wrap forever and a batch may straddle two epochs. ``Batches.state()`` is ``{epoch, index, rows}``.
  Validation: the first ``eval_batches`` batches of the validation rows in order; a last partial batch
  is filled with fully masked rows so every eval batch has the same shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def segment_positions(segment_ids_BS: np.ndarray) -> np.ndarray:
  """Positions that restart at 0 wherever the segment id changes (as ``llama.segment_positions``)."""
  B, S = segment_ids_BS.shape
  idx_BS = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
  starts_BS = np.concatenate([np.ones((B, 1), bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]], axis=1)
  return (idx_BS - np.maximum.accumulate(np.where(starts_BS, idx_BS, 0), axis=1)).astype(np.int32)


class Rows:
  """The rows of one split: ``rows(indices_B) -> batch`` with rows of ``seq_len + 1`` tokens.

  ``packing``: row ``r`` is ``tokens[r*S : r*S + S + 1]`` (rows overlap by one token); otherwise row
  ``d`` is document ``d`` truncated to ``S + 1`` tokens. Short rows are padded with ``pad_id``.
  """

  def __init__(self, tokens_N: np.ndarray, offsets_D1: np.ndarray, seq_len: int, packing: bool, pad_id: int):
    self.tokens_N, self.seq_len, self.packing, self.pad_id = tokens_N, seq_len, packing, pad_id
    n_tokens = int(tokens_N.size)
    if packing:  # a row's start and length follow from its index: nothing per row is kept
      self.n_rows = -(-(n_tokens - 1) // seq_len) if n_tokens > 1 else 0  # every token but the first is a target
      self.offsets_D1 = offsets_D1
    else:
      keep = np.diff(offsets_D1) > 1  # a document of only eos has no target
      self._starts_R = offsets_D1[:-1][keep].astype(np.int64)
      self._lengths_R = np.minimum(np.diff(offsets_D1)[keep], seq_len + 1)
      self.n_rows = int(self._starts_R.size)

  def __len__(self) -> int:
    return self.n_rows

  def starts_and_lengths(self, indices_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first token and the number of tokens (at most ``seq_len + 1``) of rows ``indices_B``."""
    indices_B = np.asarray(indices_B, np.int64)
    if indices_B.size and not 0 <= indices_B.min() <= indices_B.max() < self.n_rows:
      raise IndexError(f"rows {indices_B.min()}..{indices_B.max()} asked of {self.n_rows}")
    if self.packing:
      starts_B = indices_B * self.seq_len
      return starts_B, np.minimum(self.tokens_N.size - starts_B, self.seq_len + 1)
    return self._starts_R[indices_B], self._lengths_R[indices_B]

  @property
  def n_targets(self) -> int:
    """Unmasked targets over all rows."""
    if self.packing:
      return max(int(self.tokens_N.size) - 1, 0)
    return int(np.sum(self._lengths_R - 1))

  def __call__(self, indices_B: np.ndarray, n_real: int | None = None) -> dict[str, np.ndarray]:
    """The batch of rows ``indices_B``; rows from ``n_real`` on are fully masked filler."""
    L = self.seq_len + 1
    offset_L = np.arange(L, dtype=np.int64)
    starts_B, lengths_B = self.starts_and_lengths(indices_B)
    lengths_B = lengths_B.copy()
    if n_real is not None:
      lengths_B[n_real:] = 0
    valid_BL = offset_L[None, :] < lengths_B[:, None]
    idx_BL = np.minimum(starts_B[:, None] + offset_L[None, :], max(self.tokens_N.size - 1, 0))
    tokens_BL = np.where(valid_BL, self.tokens_N[idx_BL], self.pad_id).astype(np.int32)
    if self.packing:
      doc_BL = np.searchsorted(self.offsets_D1, idx_BL, side="right") - 1  # the document of each token
      segments_BL = np.where(valid_BL, doc_BL - doc_BL[:, :1] + 1, 0).astype(np.int32)
    else:
      segments_BL = valid_BL.astype(np.int32)
    segment_ids_BS = segments_BL[:, :-1]
    return {
        "inputs": tokens_BL[:, :-1],
        "targets": tokens_BL[:, 1:],
        "loss_mask": valid_BL[:, 1:].astype(np.float32),
        "segment_ids": segment_ids_BS,
        "positions": segment_positions(segment_ids_BS),
    }


class Batches:
  """Training batches forever: rows shuffled per epoch by ``default_rng((seed, epoch))``; resumable.

  ``state()`` is ``{"epoch", "index", "rows"}`` (plain ints, JSON-safe); ``restore(state)`` continues
  exactly where ``state()`` was taken. A batch may straddle an epoch boundary.
  """

  def __init__(self, rows: Rows, batch_size: int, seed: int = 0):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if len(rows) == 0:
      raise ValueError("the training split has no rows")
    self.rows, self.batch_size, self.seed = rows, int(batch_size), int(seed)
    self.epoch, self.index = 0, 0
    self._permutation_epoch, self._permutation = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    if self._permutation_epoch != epoch:
      self._permutation = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
      self._permutation_epoch = epoch
    return self._permutation

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "index": int(self.index), "rows": len(self.rows)}

  def restore(self, state: dict[str, Any]) -> None:
    rows = int(state.get("rows", len(self.rows)))
    if rows != len(self.rows):
      raise ValueError(f"the training data has {len(self.rows)} rows but the saved data state is for {rows} rows; "
                       "the corpus, tokenizer or data config changed")
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < len(self.rows):
      raise ValueError(f"invalid data state {dict(state)!r}")
    self.epoch, self.index = epoch, index

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    picked, needed = [], self.batch_size
    while needed:
      take = self.permutation(self.epoch)[self.index:self.index + needed]
      picked.append(take)
      needed -= take.size
      self.index += take.size
      if self.index == len(self.rows):
        self.epoch, self.index = self.epoch + 1, 0
    return self.rows(np.concatenate(picked))


def eval_batch_list(rows: Rows, batch_size: int, max_batches: int | None) -> list[dict[str, np.ndarray]]:
  """The first ``max_batches`` batches of ``rows`` in order (all when None); the last is filled out."""
  n_rows = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
  batches = []
  for start in range(0, n_rows, batch_size):
    indices_B = np.arange(start, start + batch_size)
    n_real = min(batch_size, n_rows - start)
    batches.append(rows(np.minimum(indices_B, n_rows - 1), n_real=n_real))
  return batches
