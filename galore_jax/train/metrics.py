"""Run metrics: one JSON object per line in ``workdir/metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax

# Dense bf16 peak FLOP/s per device kind, for MFU.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
                   "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCe": 312e12}


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_BF16_FLOPS.items() if kind.startswith(k)), None)


def memory_gb(device) -> dict[str, float]:
  """Memory in use and peak on the device, where the backend reports them (GPU/TPU, not CPU)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without the call
    stats = {}
  names = {"memory_in_use_gb": "bytes_in_use", "memory_peak_gb": "peak_bytes_in_use"}
  return {name: stats[key] / 1e9 for name, key in names.items() if key in stats}


def perplexity(loss: float) -> float:
  """``exp(loss)``: ``inf`` past the float range, ``nan`` for a ``nan`` loss (a diverged run)."""
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


def validation_loss(loss_and_tokens: Callable, batches) -> tuple[float | None, float]:
  """``(loss per predicted token, tokens)`` over ``batches``; ``loss_and_tokens(batch)`` gives both summed.

  The loss is None when the batches predict no token (``data.validation_fraction = 0`` leaves no validation
  split): a loss of 0 there would read as a perfect model.
  """
  loss_sum = tokens = 0.0
  for batch in batches:
    loss, count = loss_and_tokens(batch)
    loss_sum, tokens = loss_sum + float(loss), tokens + float(count)
  return (loss_sum / tokens if tokens else None), tokens


class MetricsFileError(ValueError):
  """A metrics file with a damaged line other than the last."""


def read_metrics(path: str, on_torn_line: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """The metric lines of ``path`` (none when it does not exist); ``NaN``/``Infinity`` read back as floats.

  A last line that is not JSON is one a killed run did not finish writing: it is dropped and
  ``on_torn_line(text)`` called. Any other bad line raises :class:`MetricsFileError` naming it.
  """
  if not os.path.exists(path):
    return []
  with open(path, errors="replace") as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (n, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise MetricsFileError(f"{path} line {n} is not JSON: {line.strip()[:80]!r}") from None
      if on_torn_line is not None:
        on_torn_line(line.strip())
  return rows


class MetricsWriter:
  """Appends metric lines; a resumed run first drops the lines of steps it will recompute (and a torn last line).

  Values are written as they are: a diverged run's ``NaN`` and ``Infinity`` (JSON extensions that Python,
  pandas and most readers accept) rather than a missing key.
  """

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True,
               on_torn_line: Callable[[str], None] | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = [m for m in read_metrics(self.path, on_torn_line) if m.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in jax.device_get(values).items()}
    self._file.write(json.dumps({"step": step, **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and math.isfinite(v):  # a NaN is in the jsonl; TensorBoard would warn
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
