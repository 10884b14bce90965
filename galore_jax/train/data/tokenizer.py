"""The tokenizer: a byte-level BPE trained on the training split and cached in the workdir, or a given one.

A trained tokenizer learns from at most ``data.tokenizer_train_bytes`` of the training split (a sample by
content hash, :meth:`~galore_jax.train.data.split.Split.sample`: the BPE trainer's time and memory grow with
its text, and a gigabyte is plenty for a 32k vocabulary), has ``<pad>``=0, ``<bos>``=1, ``<eos>``=2 and is
saved with ``save_pretrained`` in ``workdir/tokenizer`` (reloadable with ``AutoTokenizer``) beside a record
of the training split it was drawn from; a later run re-uses it and refuses a cache trained on a different
corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Collection

from galore_jax.train import workdir as workdir_lib
from galore_jax.train.data.spec import one_line, text_size
from galore_jax.train.data.split import Split, fingerprint

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in a trained tokenizer
CORPUS_RECORD = "galore_jax_corpus.json"  # next to a trained tokenizer: what it was trained on


def train_tokenizer(documents: Collection[str], vocab_size: int):
  """A byte-level BPE with ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2) as a ``PreTrainedTokenizerFast``.

  ``documents`` is iterated once (a :class:`~galore_jax.train.data.split.Split` streams from disk).
  """
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  backend.train_from_iterator(iter(documents), trainer=trainer, length=len(documents))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def load_tokenizer(path: str, what: str = "data.tokenizer"):
  """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; ``ValueError`` naming ``what`` and ``path``
  if unreadable."""
  if not os.path.isdir(path):
    raise ValueError(f"{what} {path!r} is not a directory")
  import transformers

  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - any failure is bad input here
    raise ValueError(f"{what} {path!r} could not be loaded ({one_line(e)})") from None


def cached_tokenizer(workdir: str, train_documents: Split, vocab_size: int, train_fingerprint: str | None = None,
                     say: Callable[[str], None] = lambda line: None, sample_bytes: int | None = None):
  """The tokenizer in ``workdir/tokenizer``, trained first if absent on ``train_documents.sample(sample_bytes)``.

  The record beside it names the whole training split (``corpus_sha256``, its :func:`fingerprint`) and the
  vocabulary: a later start on other training documents or another ``vocab_size`` is refused, whatever
  sample it would have drawn. ``train_fingerprint`` is that fingerprint when the caller has it (computing it
  reads the documents once more); ``say`` gets a line before and after a training.
  """
  directory = os.path.join(workdir, "tokenizer")
  record = {"corpus_sha256": train_fingerprint or fingerprint(train_documents), "vocab_size": int(vocab_size)}
  record_path = os.path.join(directory, CORPUS_RECORD)
  if os.path.isdir(directory) and os.path.isfile(record_path):
    with open(record_path) as f:
      saved = json.load(f)
    saved = {key: saved.get(key) for key in record} if isinstance(saved, dict) else {}
    if saved != record:
      changed = (f"with vocab_size {saved.get('vocab_size')}, not {vocab_size}" if saved.get("vocab_size") != vocab_size
                 else "on other training documents (data.path's text or caps changed); to resume, restore them")
      raise ValueError(f"the tokenizer cached in {directory!r} was trained {changed}; this workdir's checkpoints "
                       "hold that tokenizer's ids, so a new run needs a fresh workdir")
  else:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
      raise ValueError(f"vocab_size {vocab_size} is below the byte-level tokenizer's minimum "
                       f"{256 + len(SPECIAL_TOKENS)}")
    sample = train_documents.sample(sample_bytes)
    of = ("the training split" if sample is train_documents else
          f"a sample of the training split: {len(sample):,} of its {len(train_documents):,} documents, "
          f"{text_size(sample.bytes)} of {text_size(train_documents.bytes)} (data.tokenizer_train_bytes)")
    say(f"data: training a byte-level BPE of {vocab_size:,} tokens on {of}")
    start = time.monotonic()
    tokenizer = train_tokenizer(sample, vocab_size)
    record = {**record, "trained_on_documents": len(sample), "trained_on_bytes": sample.bytes}
    say(f"data: tokenizer trained in {time.monotonic() - start:.0f} s")

    def write(tmp):
      tokenizer.save_pretrained(tmp)
      with open(os.path.join(tmp, CORPUS_RECORD), "w") as f:
        json.dump(record, f)

    workdir_lib.write_dir_atomic(directory, write, CORPUS_RECORD)
  return load_tokenizer(directory, "the run's trained tokenizer")


def checked_tokenizer(tokenizer, name: str, vocab_size: int):
  """``tokenizer`` if it fits the model's vocabulary, else ``ValueError`` naming both sizes."""
  if len(tokenizer) > vocab_size:
    raise ValueError(f"tokenizer {name!r} has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
  special_ids(tokenizer)  # has an eos
  return tokenizer


def special_ids(tokenizer) -> tuple[int, int, int | None]:
  """``(pad_id, eos_id, bos_id)``; pad falls back to eos, bos may be None; no eos raises ``ValueError``."""
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return int(pad_id), int(eos_id), None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 of the tokenizer's whole definition (its backend's JSON, or its vocabulary) and special ids."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256((type(tokenizer).__name__ + text + repr(special_ids(tokenizer))).encode()).hexdigest()
