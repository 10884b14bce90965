"""A run's own copy of what it read from outside its workdir to build the model: ``workdir/base_model``.

A fine-tune names a Hugging Face checkpoint (``model.hf_checkpoint``, often a 16 GB download) whose
``config.json`` is the model's architecture, and a tokenizer (``data.tokenizer``, by default that
checkpoint's). Restoring the run needs both again, long after its start, when the base checkpoint may
have been moved or deleted. So the run's first start writes, next to its checkpoints::

  workdir/base_model/config.json        # model.hf_checkpoint's config.json, byte for byte
  workdir/base_model/tokenizer*.json    # data.tokenizer, as transformers' save_pretrained writes it
  workdir/base_model/base_model.json    # where they came from (written last: the copy is complete)

and :func:`use_copy` points a restored run's config at it, so ``eval.py``,
:func:`galore_jax.train.load_model` and the export to transformers read only the workdir (and the corpus,
for the validation loss). The weights are not copied: the checkpoints hold the trained ones. The copy is
written once and never replaced, since it records what the run started from; a run with neither key set
(a preset, a tokenizer trained into ``workdir/tokenizer``) has nothing to copy.
"""

from __future__ import annotations

import json
import os
import shutil

from galore_jax.train.workdir import write_dir_atomic

DIRECTORY = "base_model"
RECORD = "base_model.json"


def save_copy(cfg, tokenizer) -> None:
  """Write ``cfg.workdir/base_model`` from ``model.hf_checkpoint`` and the loaded ``tokenizer`` of ``data.tokenizer``.

  Nothing is written when neither key is set or when the workdir already holds a complete copy.
  """
  sources = {"hf_checkpoint": cfg.model.hf_checkpoint, "tokenizer": cfg.data.tokenizer}
  final = os.path.join(cfg.workdir, DIRECTORY)
  if not any(sources.values()) or os.path.isfile(os.path.join(final, RECORD)):
    return

  def write(tmp: str) -> None:
    if sources["hf_checkpoint"]:
      shutil.copyfile(os.path.join(sources["hf_checkpoint"], "config.json"), os.path.join(tmp, "config.json"))
    if sources["tokenizer"]:
      tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, RECORD), "w") as f:
      json.dump(sources, f, indent=2)

  write_dir_atomic(final, write, RECORD)


def use_copy(cfg) -> None:
  """Point ``model.hf_checkpoint`` and ``data.tokenizer`` of a run's saved config at the workdir's copy, in place.

  Each key is pointed at the copy only when it is set and the copy holds it; a workdir without a copy
  (a run from before it was written) keeps the original paths.
  """
  directory = os.path.join(cfg.workdir, DIRECTORY)
  try:
    with open(os.path.join(directory, RECORD)) as f:
      copied = json.load(f)
  except (OSError, ValueError):
    copied = None
  if not isinstance(copied, dict):
    return
  if cfg.model.get("hf_checkpoint") and copied.get("hf_checkpoint"):
    cfg.model.hf_checkpoint = directory
  if cfg.data.get("tokenizer") and copied.get("tokenizer"):
    cfg.data.tokenizer = directory
