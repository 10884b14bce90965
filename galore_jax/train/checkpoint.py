"""Orbax checkpoints of a training run: parameters, optimizer state (with the GaLore bases), and
a small JSON record (step, data position, config).

Orbax restores a checkpoint of a smaller model into a bigger target without complaint (orbax
#2972), so every restore first compares the saved tree's paths, shapes and dtypes with the target
and refuses the first mismatch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from galore_jax.optim.plan import path_str


class CheckpointMismatch(ValueError):
  """A checkpoint whose trees differ from what the current config builds."""


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'layers/0/attn/q_proj/kernel': (shape, dtype)}``; orbax's metadata spells list indices as strings."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in flat}


def check_compatible(item: str, saved, target) -> None:
  """Raise :class:`CheckpointMismatch` naming the first leaf whose path, shape or dtype differs."""
  saved_shapes, target_shapes = _flat_shapes(saved), _flat_shapes(target)
  for path, (shape, dtype) in target_shapes.items():
    if path not in saved_shapes:
      raise CheckpointMismatch(f"checkpoint {item} lacks {path} {shape} that the config builds")
    if saved_shapes[path] != (shape, dtype):
      raise CheckpointMismatch(
          f"checkpoint {item} {path} is {saved_shapes[path][0]} {saved_shapes[path][1]}, the config builds {shape} {dtype}")
  for path, (shape, _) in saved_shapes.items():
    if path not in target_shapes:
      raise CheckpointMismatch(f"checkpoint {item} has {path} {shape} that the config does not build")


def _placed(tree):
  """Restore targets: leaves without a sharding go to the default device (orbax would otherwise use the
  sharding they were saved with, which names devices this process may not have)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      tree)


class Checkpoints:
  """A run's checkpoint directory: save every ``every`` steps, keep the latest ``keep``.

  ``read_only=True`` (readers: evaluation, :func:`galore_jax.train.load_model`) creates, deletes and
  cleans up nothing: orbax would otherwise create the directory and delete the temporary directory of a
  save that a training run still has in flight.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict[str, Any], *, force: bool = False) -> bool:
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )

  def _saved_tree(self, step: int, item: str):
    metadata = self._manager.item_metadata(step)
    tree = metadata[item] if item in metadata else None
    if tree is None:
      raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} has no {item!r}")
    return getattr(tree, "tree", tree)

  def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
    """Parameters, optimizer state and the JSON record of ``step``, checked against the targets.

    The targets' shardings (``jax.ShapeDtypeStruct(..., sharding=...)``) place the restored arrays, on any
    mesh, whatever mesh saved them; leaves without one go to the default device.
    """
    check_compatible("params", self._saved_tree(step, "params"), abstract_params)
    check_compatible("opt_state", self._saved_tree(step, "opt_state"), abstract_opt_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_placed(abstract_params)),
            opt_state=ocp.args.StandardRestore(_placed(abstract_opt_state)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["params"], restored["opt_state"], restored["meta"]

  def restore_params(self, step: int, abstract_params) -> tuple[Any, dict]:
    """Only the parameters (and the JSON record): evaluation needs no optimizer."""
    check_compatible("params", self._saved_tree(step, "params"), abstract_params)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(_placed(abstract_params)),
                                meta=ocp.args.JsonRestore()),
    )
    return restored["params"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
