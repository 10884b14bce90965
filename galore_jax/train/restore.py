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

from galore_jax.train.checkpoint import CheckpointMismatch, Checkpoints

__all__ = ["CheckpointMismatch", "RunNotLoadable", "load_model", "load_run_config"]


class RunNotLoadable(ValueError):
  """A workdir that holds no readable run config or no such checkpoint; the message names it."""


def load_run_config(workdir: str):
  """The ``config.json`` a training run saved in ``workdir`` as a ConfigDict (``workdir`` set to this path)."""
  from ml_collections import config_dict

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise RunNotLoadable(f"workdir {workdir!r} has no config.json: not a training run")
  try:
    with open(path) as f:
      cfg = config_dict.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise RunNotLoadable(f"{path!r} cannot be read: {e}") from None
  cfg.workdir = workdir
  return cfg


def load_model(workdir: str, step: int | None = None):
  """``(model, config)``: the Flax NNX Llama of ``workdir``'s checkpoint ``step`` and the run's config.

  Args:
    workdir: a training run's workdir (``config.json`` and ``checkpoints/``).
    step: the checkpoint step; None for the latest.

  Returns:
    ``model``: a :class:`galore_jax.models.llama.Llama` holding the saved parameters, on the default
    device, in the dtypes they were trained in; ``config``: the run's ConfigDict.

  Raises:
    RunNotLoadable: no readable ``config.json``, no checkpoint, ``step`` is not a saved step, or its
      files cannot be read.
    CheckpointMismatch: the checkpoint's parameters differ from what the config builds.
  """
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
    try:
      params, _ = ckpts.restore_params(step, steps.params_of(abstract))
    except CheckpointMismatch:
      raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for unreadable files
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise RunNotLoadable(f"checkpoint step {step} in {ckpts.directory} cannot be read: {reason}") from None
  finally:
    ckpts.close()
  return nnx.merge(nnx.graphdef(abstract), params), cfg
