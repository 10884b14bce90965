"""A training run's checkpoint as a model in Python::

  from galore_jax.train import load_model

  model, config = load_model("workdir/tiny")           # the latest checkpoint
  model, config = load_model("workdir/tiny", step=200)
  logits_BSV = model(token_ids_BS)

Only the parameters are read (no optimizer state), against the model that the run's saved
``config.json`` builds; nothing in the workdir is created, changed or deleted, so a run may still be
training there. (Orbax alone cannot do it from the files: the layer keys are saved as strings and
the structure comes from the config.)
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from galore_jax.train import base_model
from galore_jax.train.checkpoint import CheckpointDamaged, CheckpointMismatch, Checkpoints

__all__ = ["CheckpointDamaged", "CheckpointMismatch", "Restored", "RunNotLoadable", "load_model", "load_run_config",
           "restore_run"]


RUN_SECTIONS = ("model", "data", "train", "optimizer")  # what restoring a model reads from a run's config


class RunNotLoadable(ValueError):
  """A workdir that holds no readable run config or no such checkpoint; the message names it."""


def load_run_config(workdir: str):
  """The ``config.json`` a training run saved in ``workdir`` as a ConfigDict.

  ``workdir`` is set to this path, and ``model.hf_checkpoint`` and ``data.tokenizer`` to the workdir's copy of
  them where it has one (:mod:`galore_jax.train.base_model`), so the base checkpoint may have moved.
  """
  from ml_collections import config_dict

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunNotLoadable(f"workdir {workdir!r} has no config.json: not a training run")
  try:
    with open(path) as f:
      loaded = json.load(f)
  except (OSError, ValueError) as e:
    raise RunNotLoadable(f"{path} is not a readable config: {e}") from None
  if not isinstance(loaded, dict):
    raise RunNotLoadable(f"{path} is not a training run's config: it holds a {type(loaded).__name__}, not an object")
  cfg = config_dict.ConfigDict(loaded)
  missing = [section for section in RUN_SECTIONS if section not in cfg]
  if missing:
    raise RunNotLoadable(f"{path} is not a training run's config: it has no {', '.join(map(repr, missing))}")
  cfg.workdir = workdir
  base_model.use_copy(cfg)
  return cfg


class Restored(NamedTuple):
  """A run's checkpoint as a model: the model, the run's config, and which step it is."""

  model: Any
  config: Any
  step: int


def load_model(workdir: str, step: int | None = None):
  """``(model, config)``: the Flax NNX Llama of ``workdir``'s checkpoint ``step`` and the run's config.

  Args:
    workdir: a training run's workdir (``config.json`` and ``checkpoints/``).
    step: the checkpoint step; None for the latest.

  Returns:
    ``model``: a :class:`galore_jax.models.llama.Llama` holding the saved parameters, on the default
    device, in the dtypes they were trained in; ``config``: the run's ConfigDict.

  Raises:
    RunNotLoadable: no readable ``config.json``, no checkpoint, or ``step`` is not a saved step.
    CheckpointMismatch: the checkpoint's parameters differ from what the config builds.
    CheckpointDamaged: the step's files are missing or unreadable (the message names the file).
  """
  restored = restore_run(workdir, step)
  return restored.model, restored.config


def restore_run(workdir: str, step: int | None = None) -> Restored:
  """:func:`load_model`, also saying which step it loaded (the latest when ``step`` is None)."""
  from flax import nnx

  from galore_jax.train import config, steps

  cfg = load_run_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise RunNotLoadable(f"workdir {workdir!r} has no checkpoint")
  abstract = config.abstract_model(cfg)
  ckpts = Checkpoints(directory, every=1, keep=1, async_save=False, read_only=True)
  try:
    saved = sorted(ckpts.all_steps())
    if not saved:
      raise RunNotLoadable(f"workdir {workdir!r} has no checkpoint")
    step = saved[-1] if step is None else step
    if step not in saved:
      raise RunNotLoadable(f"step {step} is not among the saved steps {saved} of {workdir!r}")
    params, _ = ckpts.restore_params(step, steps.params_of(abstract))
  finally:
    ckpts.close()
  return Restored(nnx.merge(nnx.graphdef(abstract), params), cfg, step)
