"""Orbax checkpoints of a training run: parameters, optimizer state (with the GaLore bases), and
a small JSON record (step, data position, config).

Orbax restores a checkpoint of a smaller model into a bigger target without complaint (orbax
#2972), so every restore first compares the saved tree's paths, shapes and dtypes with the target
and refuses the first mismatch.

Faults are reported in one line each: a damaged checkpoint (:class:`CheckpointDamaged`, naming the step
and the file, never with tensorstore's spec dump) and a save that failed in the background
(:class:`SaveFailed`, noticed at the first :meth:`Checkpoints.check_saved` after it ended). A checkpoint is
never deleted for being damaged: :meth:`Checkpoints.set_aside_after` moves the steps after the one a run
resumes from out of orbax's sight, next to the checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from galore_jax.optim.plan import path_str


class CheckpointMismatch(ValueError):
  """A checkpoint whose trees differ from what the current config builds."""


class CheckpointDamaged(ValueError):
  """A checkpoint whose files are missing or unreadable; the message names the step and the file."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (a full disk, a vanished directory...); the message names the path."""

  def __init__(self, step: int, path: str, error: BaseException):
    super().__init__(f"checkpoint step {step} could not be saved to {path}: {one_line(error)}")
    self.step = step


class _QuietOrbax(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def _drop_closed_loop_noise() -> None:
  """Keep tensorstore's "Event loop is closed" tracebacks and orbax's never-awaited coroutines off stderr, from
  now on in this process (once).

  When orbax gives up on a restore (a damaged file) or a background save, the tensorstore reads and writes
  still in flight finish later on tensorstore's threads and report to an asyncio loop that orbax has closed;
  Python prints each as a traceback through ``sys.unraisablehook``. Only that error is dropped, and the
  warning about a coroutine that was never awaited.
  """
  previous_hook = sys.unraisablehook
  if getattr(previous_hook, "drops_closed_loop_noise", False):
    return

  def hook(unraisable) -> None:
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous_hook(unraisable)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook
  # The same failure can leave one of orbax's write coroutines never started; Python reports it at exit as
  # "sys:1: RuntimeWarning: coroutine '...write_fragment' was never awaited" (two lines, now and then).
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  # A second read that failed as well is a task nobody awaits once the first failure ends the restore: asyncio
  # logs it at exit as "Task exception was never retrieved" and its traceback (eight lines, now and then).
  logging.getLogger("asyncio").addFilter(_UnretrievedTask())


class _UnretrievedTask(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Task exception was never retrieved")


def quiet_orbax_logging() -> None:
  """Drop orbax's log records (it logs a failed background save as hundreds of traceback lines, from its
  threads); the app reports every checkpoint fault itself, in one line."""
  logging.getLogger("absl").addFilter(_QuietOrbax())


META_FILE = "metadata"  # the JSON record's file in a step's meta/ (given to orbax's JsonCheckpointHandler)
TREE_METADATA = "_METADATA"  # orbax's tree metadata file in a step's params/ and opt_state/
_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")  # a tensorstore status: 'NOT_FOUND: ...', 'DATA_LOSS: ...'


def one_line(error: BaseException, relative_to: str | None = None) -> str:
  """An exception as one readable line: the innermost tensorstore status (``NOT_FOUND: ...``) when the chain
  holds one, without tensorstore's spec dump, paths under ``relative_to`` shortened, at most 400 characters."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  status = [str(e) for e in chain if _STATUS.match(str(e))]
  if status:
    text = status[-1]
  elif isinstance(error, OSError):  # '[Errno 28] No space left on device: 'path''
    text = str(error)
  else:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
  text = re.split(r" \[tensorstore_spec=| See full TensorStore details", text)[0]
  if relative_to:
    text = text.replace(relative_to.rstrip(os.sep) + os.sep, "")
  text = " ".join(text.split())
  return text if len(text) <= 400 else text[:397] + "..."


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'layers/0/attn/q_proj/kernel': (shape, dtype)}``; orbax's metadata spells list indices as strings."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in flat}


_LAYERS = re.compile(r"(?:^|/)layers/([^/]+)/")  # a parameter path's layer index, or its first name if stacked


def _layers_layout(paths) -> str | None:
  """``"unrolled"`` (``layers/0/...``), ``"stacked"`` (``layers/attn/...``, ``model.scan_layers``) or None."""
  for path in paths:
    found = _LAYERS.search(path)
    if found:
      return "unrolled" if found.group(1).isdigit() else "stacked"
  return None


def check_compatible(item: str, saved, target) -> None:
  """Raise :class:`CheckpointMismatch` naming the first leaf whose path, shape or dtype differs; for the
  parameters, first the layers' layout when the checkpoint's (the one it was trained with) is not the config's."""
  saved_shapes, target_shapes = _flat_shapes(saved), _flat_shapes(target)
  if item == "params":  # only parameter paths tell the layout: in an optimizer state "layers/0/" may be a chain index
    saved_layout, target_layout = _layers_layout(saved_shapes), _layers_layout(target_shapes)
    if saved_layout and target_layout and saved_layout != target_layout:
      raise CheckpointMismatch(
          f"checkpoint params has its layers {saved_layout} and the config builds them {target_layout} "
          f"(model.scan_layers={target_layout == 'stacked'}): resume with "
          f"--config.model.scan_layers={saved_layout == 'stacked'}, the layout the run was trained with")
  for path, (shape, dtype) in target_shapes.items():
    if path not in saved_shapes:
      raise CheckpointMismatch(f"checkpoint {item} lacks {path} {shape} that the config builds")
    if saved_shapes[path] != (shape, dtype):
      raise CheckpointMismatch(
          f"checkpoint {item} {path} is {saved_shapes[path][0]} {saved_shapes[path][1]}, "
          f"the config builds {shape} {dtype}")
  for path, (shape, _) in saved_shapes.items():
    if path not in target_shapes:
      raise CheckpointMismatch(f"checkpoint {item} has {path} {shape} that the config does not build")


def _placed(tree):
  """Restore targets: leaves without a sharding go to the default device (orbax would otherwise use the
  sharding they were saved with, which names devices this process may not have)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: (x if getattr(x, "sharding", None) is not None
                 else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)),
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
                "meta": ocp.JsonCheckpointHandler(META_FILE)}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    _drop_closed_loop_noise()  # before any read or write: a failed one is reported in one line, not by stray threads
    self._in_flight: int | None = None  # the step whose background save has not been checked yet
    self._closed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def due(self, step: int) -> bool:
    """Whether the policy saves ``step`` (every ``every`` steps, none twice)."""
    return self._manager.should_save(step)

  def save(self, step: int, params, opt_state, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Start saving ``step`` (in the background when async); :class:`SaveFailed` for this save or the one before."""
    self._finish_in_flight()
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              params=ocp.args.StandardSave(params),
              opt_state=ocp.args.StandardSave(opt_state),
              meta=ocp.args.JsonSave(meta),
          ),
          force=force,
      )
    except Exception as e:  # noqa: BLE001 - whatever the disk says, the message names the path
      raise SaveFailed(step, self.step_dir(step), e) from None
    if saved:
      self._in_flight = step
    return saved

  def check_saved(self) -> None:
    """:class:`SaveFailed` if the save in flight has ended with an error; never waits for one still running."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self._finish_in_flight()

  def _finish_in_flight(self) -> None:
    if self._in_flight is None:
      return
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the background save's error, re-raised by orbax
      raise SaveFailed(step, self.step_dir(step), e) from None

  def check_files(self, step: int) -> None:
    """:class:`CheckpointDamaged` naming the first file of ``step`` that is missing or not JSON where orbax
    needs one (orbax itself reads a missing tree's metadata as an absent item, and bad JSON without a path)."""
    root, where = self.step_dir(step), f"checkpoint step {step} in {self.directory} is damaged"
    for name in (f"params/{TREE_METADATA}", f"opt_state/{TREE_METADATA}", f"meta/{META_FILE}"):
      path = os.path.join(root, name)
      try:
        with open(path) as f:
          json.load(f)
      except FileNotFoundError:
        raise CheckpointDamaged(step, f"{where}: {name} is missing") from None
      except (OSError, ValueError) as e:
        raise CheckpointDamaged(step, f"{where}: {name} is not readable JSON ({one_line(e)})") from None

  def _saved_tree(self, step: int, item: str):
    try:
      metadata = self._manager.item_metadata(step)
    except Exception as e:  # noqa: BLE001 - after check_files, only unusual damage gets here
      raise CheckpointDamaged(step, f"checkpoint step {step} in {self.directory} is damaged: "
                                    f"{one_line(e, relative_to=self.step_dir(step))}") from None
    tree = metadata[item] if item in metadata else None
    if tree is None:
      raise CheckpointMismatch(f"checkpoint step {step} in {self.directory} has no {item!r}")
    return getattr(tree, "tree", tree)

  def _read(self, step: int, args: dict[str, Any]) -> dict[str, Any]:
    """Orbax's restore of ``args``; any error becomes :class:`CheckpointDamaged` naming the step and the file."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise many kinds on damaged files
      raise CheckpointDamaged(step, f"checkpoint step {step} in {self.directory} is damaged: "
                                    f"{one_line(e, relative_to=self.step_dir(step))}") from None

  def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
    """Parameters, optimizer state and the JSON record of ``step``, checked against the targets.

    The targets' shardings (``jax.ShapeDtypeStruct(..., sharding=...)``) place the restored arrays, on any
    mesh, whatever mesh saved them; leaves without one go to the default device. Raises
    :class:`CheckpointMismatch` (another model or optimizer) or :class:`CheckpointDamaged`.
    """
    self.check_files(step)
    check_compatible("params", self._saved_tree(step, "params"), abstract_params)
    check_compatible("opt_state", self._saved_tree(step, "opt_state"), abstract_opt_state)
    restored = self._read(step, {"params": ocp.args.StandardRestore(_placed(abstract_params)),
                                 "opt_state": ocp.args.StandardRestore(_placed(abstract_opt_state)),
                                 "meta": ocp.args.JsonRestore()})
    return restored["params"], restored["opt_state"], restored["meta"]

  def restore_params(self, step: int, abstract_params) -> tuple[Any, dict]:
    """Only the parameters (and the JSON record): evaluation needs no optimizer."""
    self.check_files(step)
    check_compatible("params", self._saved_tree(step, "params"), abstract_params)
    restored = self._read(step, {"params": ocp.args.StandardRestore(_placed(abstract_params)),
                                 "meta": ocp.args.JsonRestore()})
    return restored["params"], restored["meta"]

  def set_aside_after(self, step: int, *, move: bool = True) -> list[str]:
    """Move every checkpoint after ``step`` to ``<directory>.set_aside/<step>`` (a run resumed from ``step``
    would otherwise meet them again, and orbax refuses to save a step that exists); the moved paths.

    Every process of a run calls it; the one with ``move`` (the first) moves the directories.
    """
    later = [s for s in self.all_steps() if s > step]
    if not later:
      return []
    self._finish_in_flight()
    moved = []
    if move:
      aside = self.directory + ".set_aside"
      os.makedirs(aside, exist_ok=True)
      for s in later:
        target, n = os.path.join(aside, str(s)), 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f"{s}.{n}"), n + 1
        os.replace(self.step_dir(s), target)
        moved.append(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("galore_jax set_aside_after")
    self._manager.reload()
    return moved

  def wait(self) -> None:
    self._finish_in_flight()

  def close(self) -> None:
    """Wait for the save in flight (:class:`SaveFailed` if it failed), then release orbax's threads; once."""
    if self._closed:
      return
    try:
      self._finish_in_flight()
    finally:
      self._closed = True
      self._manager.close()
