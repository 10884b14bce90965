"""Compile for a GPU this machine does not have: XLA's CUDA compiler on a compile-only device.

jax's CUDA plugin compiles without a GPU when it is given the target's description (a
``GpuTargetConfigProto`` in ``bench/gpu_targets/<name>.txtpb``) through ``jax.experimental.topologies``:
the program is lowered for CUDA and goes through XLA's GPU passes, fusion and buffer assignment, so
``compiled.memory_analysis()`` and the dumped buffer assignment are the GPU's. Nothing runs: a compile-only
device holds no memory, and autotuning (which times kernels on the device) is skipped, which does not move
buffers. The plugin is not a dependency of the package; ``make .venv/gpu_aot/.installed`` puts the one that
matches the installed jaxlib into its own folder (``GPU_AOT_PLUGIN`` names another), and a process that
compiles for a target is started with :func:`environment` so that jax finds the plugin but never tries to
drive a GPU.

  env = gpu_target.environment()          # in the parent, for the child process
  device = gpu_target.device("h100")      # in the child
  dry_run.dry_run(cfg, device=device)     # the H100's XLA memory figures
"""

from __future__ import annotations

import glob
import os

from bench import common

TARGETS_DIR = os.path.join(common.ROOT, "bench", "gpu_targets")
INSTALL = "make .venv/gpu_aot/.installed"


def plugin_dir() -> str:
  return os.environ.get("GPU_AOT_PLUGIN") or os.path.join(common.ROOT, ".venv", "gpu_aot")


def targets() -> list[str]:
  return sorted(os.path.basename(p)[:-len(".txtpb")] for p in glob.glob(os.path.join(TARGETS_DIR, "*.txtpb")))


def check(target: str) -> None:
  """A one-line error for an unknown target or a missing plugin (before any child process starts)."""
  if target not in targets():
    common.fail(f"--compile_for {target!r}: the GPU targets are {targets()} (bench/gpu_targets/*.txtpb)")
  if not os.path.isdir(os.path.join(plugin_dir(), "jax_plugins", "xla_cuda12")):
    common.fail(f"--compile_for {target!r} needs jax's CUDA plugin in {plugin_dir()!r}: run `{INSTALL}`")


def environment(base: dict | None = None) -> dict:
  """A child process's environment: the plugin importable, jax on the CPU, no check of CUDA libraries (none
  are installed, and none are needed to compile)."""
  env = dict(os.environ if base is None else base)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (plugin_dir(), env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "2")  # the plugin's "no CUDA driver" notices
  return env


def device(target: str):
  """A compile-only device of ``target`` (one GPU); in a process started with :func:`environment`."""
  from jax.experimental import topologies

  with open(os.path.join(TARGETS_DIR, f"{target}.txtpb")) as f:
    description = f.read()
  topology = topologies.get_topology_desc(platform="cuda", topology_name=target, target_config=description,
                                          topology="1x1x1")
  return topology.devices[0]
