"""What every benchmark script shares: provenance, timing, the presets and their paper settings, argument checks,
synthetic inputs and results files.

Scripts run from the repository root as ``python -m bench.<name>``. Each results file carries the same provenance
at its top level (:func:`provenance`): ``date``, ``command`` (the exact ``python -m bench.<name> ...`` line),
``backend``, ``device``, ``device_count``, ``cpu_count``, ``versions`` (jax, jaxlib, optax, flax, numpy, python,
galore_jax, and torch when it was imported) and ``env`` (the variables that change what XLA runs).

The model shapes come from :data:`galore_jax.models.llama.PRESETS`; the GaLore settings of a preset (rank, gap,
scale, learning rate) from its paper config in ``configs/`` (:func:`run_config`), so that a rank is written in one
place, the config file.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax.models import llama
from galore_jax.optim.introspect import tree_bytes
from galore_jax.train import steps

__all__ = ["PRESETS", "RESULTS", "ROOT", "SEPARATOR", "ArgumentParser", "attn_mlp_dimension_numbers", "choose",
           "command", "fail", "layer_kernels", "paper_settings", "provenance", "random_batch", "rank", "run_config",
           "seconds", "set_count", "summary", "timings", "tree_bytes", "versions", "write_json"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
PRESETS = tuple(llama.PRESETS)
# configs/<name>.py files built by configs.base.paper(): the GaLore paper's settings of their preset.
PAPER_CONFIGS = ("llama60m", "llama130m", "llama350m", "llama1b", "llama7b")
SEPARATOR = ","  # of name lists (--only, --fast, --variants): no benchmark name may contain it
ENV_KEYS = ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "JAX_COMPILATION_CACHE_DIR")
EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------- provenance


def versions() -> dict[str, str]:
  """Versions of the libraries a measurement depends on (torch only when the script imported it)."""
  import flax
  import jaxlib
  import optax

  import galore_jax

  found = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
           "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "galore_jax": galore_jax.__version__}
  if "torch" in sys.modules:
    found["torch"] = sys.modules["torch"].__version__
  return found


def command(module: str, argv: Sequence[str]) -> str:
  """The command line that reruns a script: ``python -m <module> <argv, shell-quoted>``."""
  return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def provenance(module: str, argv: Sequence[str], *, probe: bool = False) -> dict[str, Any]:
  """Where, when and how a result was measured: the top-level keys of every results file.

  ``probe``: read the device in a short child process, so that this process never starts a backend (on a GPU a
  started backend takes most of the memory, which the GPU children of this process then lack).
  """
  backend, device, count = _device_in_child() if probe else (jax.default_backend(), jax.devices()[0].device_kind,
                                                              jax.device_count())
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": command(module, argv), "commit": commit(), "backend": backend, "device": device,
          "device_count": count, "cpu_count": os.cpu_count(), "versions": versions(),
          "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}


@functools.cache
def commit() -> str | None:
  """The measured code's git commit (``+`` when the work tree has changes), or None outside a git checkout."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

  try:
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return None


@functools.cache
def _device_in_child() -> tuple[str, str, int]:
  code = "import jax; print(jax.default_backend()); print(jax.devices()[0].device_kind); print(jax.device_count())"
  done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"),
                        capture_output=True, text=True, check=True)
  backend, device, count = done.stdout.strip().splitlines()[-3:]
  return backend, device, int(count)


def write_json(path: str, record: Any) -> str:
  """Write ``record`` to ``path`` atomically (a run killed while writing keeps the previous file); the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------- timing


def seconds(fn: Callable[..., Any], *args) -> tuple[Any, float]:
  """``fn(*args)`` and the wall seconds until every output is ready (``jax.block_until_ready``)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def timings(fn: Callable[..., Any], *args, warmup: int = 1, repeats: int = 5) -> list[float]:
  """Seconds of ``repeats`` calls of ``fn(*args)`` after ``warmup`` untimed ones, each until its outputs are ready.

  ``fn`` should be compiled already (``jit(...).lower(...).compile()``) or be warmed up by ``warmup >= 1``, so
  that no sample holds a compile.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  return [seconds(fn, *args)[1] for _ in range(repeats)]


def summary(samples: Sequence[float]) -> dict[str, Any]:
  """Median, min, max and quartiles of ``samples``, with the samples themselves."""
  q25, q75 = np.percentile(samples, [25, 75]).tolist()
  return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "p25": q25, "p75": q75,
          "n": len(samples), "samples": list(samples)}


# ----------------------------------------------------------------------------- presets and paper settings


@functools.cache
def _paper_configs() -> dict[str, Any]:
  configs = [importlib.import_module(f"configs.{name}").get_config() for name in PAPER_CONFIGS]
  return {cfg.model.preset: cfg for cfg in configs}


def run_config(preset: str):
  """The training config of ``preset``: its paper config (``configs/llama*.py``) when it has one, else
  ``configs.base.base()`` with the preset and rank ``hidden_size // 4`` (the paper's ratio at 60M, 350M, 1B
  and 7B). A fresh copy: callers may change it."""
  from configs.base import base

  if preset not in llama.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
  if preset in _paper_configs():
    return _paper_configs()[preset].copy_and_resolve_references()
  cfg = base()
  cfg.model.preset = preset
  cfg.optimizer.rank = llama.PRESETS[preset].hidden_size // 4
  return cfg


def rank(preset: str) -> int:
  """The GaLore rank of ``preset`` (:func:`run_config`'s)."""
  return run_config(preset).optimizer.rank


def paper_settings(preset: str) -> dict[str, Any]:
  """``rank``, ``update_proj_gap``, ``scale`` and ``lr`` of ``preset``'s run config."""
  cfg = run_config(preset)
  return {"rank": cfg.optimizer.rank, "update_proj_gap": cfg.optimizer.update_proj_gap,
          "scale": cfg.optimizer.scale, "lr": cfg.train.lr}


def layer_kernels(model_cfg: llama.LlamaConfig) -> dict[str, tuple[int, int]]:
  """One decoder layer's attention and MLP kernels, ``"attn/q_proj" -> (in, out)`` (Flax layout), read off the
  model's abstract parameters."""
  from flax import nnx

  model = nnx.eval_shape(lambda: llama.Llama(model_cfg.replace(num_hidden_layers=1, scan_layers=False),
                                             rngs=nnx.Rngs(0)))
  layer = steps.params_of(model)["layers"][0]
  return {f"{module}/{name}": tuple(leaf["kernel"].shape) for module in ("attn", "mlp")
          for name, leaf in sorted(layer[module].items())}


# ----------------------------------------------------------------------------- argument checks


def fail(message: str) -> None:
  """Bad input: one line ``error: ...`` on stderr, exit code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line ``error: ...`` with exit code 2 (no usage block)."""

  def __init__(self, doc: str | None, **kwargs):
    super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

  def error(self, message: str) -> None:
    fail(message)


def int_within(low: int, high: int | None = None) -> Callable[[str], int]:
  """An argparse ``type``: an int in ``low..high``; outside it, the parser's one-line error names the value."""

  def parse(text: str) -> int:
    value = int(text)
    if high is None and value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    if high is not None and not low <= value <= high:
      raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
    return value

  parse.__name__ = "int"  # argparse's word for a value that is not an int at all
  return parse


def choose(names: str | Iterable[str], known: Iterable[str], what: str) -> list[str]:
  """The names of a list argument (a ``SEPARATOR``-joined string or a list), each checked against ``known``."""
  known = list(known)
  chosen = [n for n in (names.split(SEPARATOR) if isinstance(names, str) else names) if n]
  unknown = [n for n in chosen if n not in known]
  if unknown:
    fail(f"unknown {what} {unknown[0]!r}; choose from {', '.join(repr(k) for k in known)}")
  return chosen


# ----------------------------------------------------------------------------- synthetic inputs


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of uniform random tokens in ``galore_jax.train.data``'s format (one segment per row)."""
  rng = np.random.default_rng(seed)
  shape = (batch, seq_len)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones(shape, np.float32),
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()}


def attn_mlp_dimension_numbers(params):
  """``optax.contrib.galore``'s ``weight_dimension_numbers`` for the 2-D leaves galore_jax projects by default
  (paths matching ``attn|mlp``), None elsewhere: both GaLore implementations then project the same matrices."""
  from optax.contrib import GaLoreDimensionNumbers

  from galore_jax.optim.plan import DEFAULT_TARGET, path_str

  return jax.tree_util.tree_map_with_path(
      lambda p, x: GaLoreDimensionNumbers(0, 1) if x.ndim == 2 and re.search(DEFAULT_TARGET, path_str(p)) else None,
      params)


def set_count(state, count: int):
  """An optax chain state with the step counter at its head (``state[0].count``) replaced.

  GaLore refreshes when ``count % update_proj_gap == 0`` (galore_jax's and optax.contrib's ``GaLoreState``);
  for adamw the counter only feeds the bias correction.
  """
  head = state[0]
  if not hasattr(head, "count"):
    raise TypeError(f"no step counter at the head of the chain state: {type(head).__name__}")
  return (head._replace(count=jnp.asarray(count, jnp.int32)), *state[1:])
