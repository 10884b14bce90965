"""Run metrics: one JSON object per line in ``workdir/metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any

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


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends metric lines; a resumed run first drops the lines of steps it will recompute."""

  def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= resume_step]
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
    clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))}
    self._file.write(json.dumps({"step": step, **clean}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
