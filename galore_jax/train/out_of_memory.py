"""Running out of device memory at the first train step: one line saying how much the step needs and how much there is.

The first call of the jitted step compiles it and allocates its buffers; either can fail with XLA's
``RESOURCE_EXHAUSTED``. That is a run that does not fit, not a bug: :func:`checked_first_step` turns it
into :class:`OutOfMemory`, whose message names the step's bytes from XLA's memory analysis (recompiled on
abstract shapes, nothing allocated), the device's memory, and where to go next.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

GB = 1e9
ADVICE = ("rerun the same command with --dry_run for the memory breakdown, or start from configs/llama7b_24gb.py "
          "(8-bit GaLore, layerwise updates, remat: Llama-7B within 24 GB)")


class OutOfMemory(RuntimeError):
  """The train step does not fit on the device; the message is one line for the user."""


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an exception is XLA's out-of-memory error (``RESOURCE_EXHAUSTED``), at compile or at run time."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def shapes_of(tree):
  """``ShapeDtypeStruct`` s (with shardings) of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def required_bytes(step, *abstract_args) -> int | None:
  """XLA's peak for the jitted ``step`` on these shapes: arguments + outputs - aliased + temporaries.

  The step is lowered on ``ShapeDtypeStruct`` s and compiled; nothing is allocated. ``None`` when it cannot
  be compiled either (the compiler itself ran out of memory).
  """
  try:
    memory = step.lower(*abstract_args).compile().memory_analysis()
  except Exception:  # noqa: BLE001 - whatever stops the compile, the figure is unknown
    return None
  if memory is None:
    return None
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def device_bytes(device) -> int | None:
  """The memory the device's allocator may use (``bytes_limit``), where the backend reports it."""
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - backends without memory_stats
    return None


def message(required: int | None, available: int | None, device) -> str:
  """The one line: what the step needs, what the device has, what to do."""
  kind = getattr(device, "device_kind", str(device))
  needs = f"{required / GB:.2f} GB (XLA's memory analysis of the step)" if required else "more than the device has"
  has = f"{available / GB:.2f} GB" if available else "an unreported amount of memory"
  return f"out of device memory at the first train step: it needs {needs} and the {kind} has {has}; {ADVICE}"


def checked_first_step(step: Callable, device=None) -> Callable:
  """``step`` whose first call waits for its result and turns XLA's out-of-memory error into :class:`OutOfMemory`.

  Later calls are ``step`` itself (no synchronisation added).
  """
  called = False

  def call(*args: Any):
    nonlocal called
    if called:
      return step(*args)
    called = True
    shapes = shapes_of(args)  # read now: the call donates (deletes) the parameters and state
    try:
      return jax.block_until_ready(step(*args))
    except Exception as e:  # noqa: BLE001 - only XLA's out-of-memory error is translated
      if not is_out_of_memory(e):
        raise
      where = device or jax.devices()[0]
      raise OutOfMemory(message(required_bytes(step, *shapes), device_bytes(where), where)) from None

  return call
