"""Data parallel + FSDP on JAX's own sharding: a ``(data, fsdp)`` mesh, and the shardings of the batch,
the parameters and the optimizer state (GaLore's bases and low-rank moments included).

The batch is split over both axes; every parameter is split over ``fsdp`` on one axis (and replicated
over ``data``), so ``fsdp`` divides the parameter and optimizer-state bytes per device while ``data``
only adds batch parallelism. XLA's partitioner inserts the all-gathers and reduce-scatters.

Shardings are a layout: they change where bytes live and what is communicated, never a result
(up to the order of floating-point reductions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from galore_jax.optim.partition import state_specs

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the leading batch axis is split over both mesh axes
AXIS_TYPES = ("auto", "explicit")
MIN_SHARDED_SIZE = 2**14  # smaller leaves (norm scales, tiny kernels) are replicated


class MeshError(ValueError):
  """A mesh size that cannot work on the available devices; the message names the value."""


def resolve_sizes(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
  """``(data, fsdp)`` with a ``-1`` replaced by all remaining devices; refuses sizes that do not fit.

  Args:
    data: size of the ``data`` axis, or -1.
    fsdp: size of the ``fsdp`` axis, or -1.
    n_devices: the devices to lay out.
  """
  for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if value == 0 or value < -1:
      raise MeshError(f"{name} must be a positive size or -1 (all remaining devices), got {value}")
  if data == -1 and fsdp == -1:
    raise MeshError("mesh.data and mesh.fsdp are both -1: at most one axis can take the remaining devices")
  if data == -1 or fsdp == -1:
    known, name = (fsdp, "mesh.fsdp") if data == -1 else (data, "mesh.data")
    if n_devices % known:
      raise MeshError(f"{name}={known} does not divide the {n_devices} devices")
    other = n_devices // known
    data, fsdp = (other, fsdp) if data == -1 else (data, other)
  if data * fsdp != n_devices:
    raise MeshError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are {n_devices}")
  return data, fsdp


def make_mesh(data: int = 1, fsdp: int = -1, axis_types: str = "auto", devices=None) -> jax.sharding.Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes).

  Args:
    data: ``data`` axis size (batch only), -1 = all remaining devices.
    fsdp: ``fsdp`` axis size (batch, parameters and optimizer state), -1 = all remaining devices.
    axis_types: ``"auto"`` (the partitioner propagates shardings) or ``"explicit"`` (shardings are part
      of the array types; see :func:`galore_jax.train.steps.make_steps` for how the step runs then).
    devices: the devices, default ``jax.devices()``.
  """
  if axis_types not in AXIS_TYPES:
    raise MeshError(f"mesh.axis_types must be one of {AXIS_TYPES}, got {axis_types!r}")
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_sizes(data, fsdp, len(devices))
  kind = jax.sharding.AxisType.Explicit if axis_types == "explicit" else jax.sharding.AxisType.Auto
  return jax.make_mesh(sizes, AXES, axis_types=(kind, kind), devices=devices)


def is_explicit(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


# ----------------------------------------------------------------------------- the batch


def batch_sharding(mesh) -> NamedSharding:
  """The leading (batch) axis over ``data`` and ``fsdp``; every other axis replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch, mesh):
  """Place a host batch (``{name: [B, ...]}``) on the mesh, split on its leading axis.

  With several processes every process holds the same global batch (the data pipeline is
  deterministic) and contributes its own contiguous ``B / process_count`` rows (two processes of one
  machine train as one process: ``tests/train/test_multihost.py``).
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def local(x):
    rows = x.shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return jax.make_array_from_process_local_data(sharding, np.asarray(x[start:start + rows]), x.shape)

  return jax.tree.map(local, batch)


# ----------------------------------------------------------------------------- parameters


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """The rule for one parameter: the larger of its last two axes over ``fsdp`` when it divides evenly,
  else the other one, else none; leading (stacked-layer) axes, 1-D leaves and leaves of fewer than
  ``min_size`` elements are replicated.

  Args:
    shape: the parameter's shape, e.g. ``[in, out]``, ``[L, in, out]`` or an embedding ``[V, D]``.
    fsdp_size: size of the ``fsdp`` mesh axis.
    min_size: leaves with fewer elements are replicated.
  """
  ndim = len(shape)
  if ndim < 2 or fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  # Larger first; a square kernel is split on its output axis, which GaLore's std rule leaves unprojected (so its
  # low-rank moments [r, n] stay split).
  last_two = sorted((ndim - 1, ndim - 2), key=lambda a: -shape[a])
  for axis in last_two:
    if shape[axis] % fsdp_size == 0:
      return P(*(("fsdp" if a == axis else None) for a in range(ndim)))
  return P()


def param_specs(params, fsdp_size: int, min_size: int = MIN_SHARDED_SIZE):
  """:func:`param_spec` for every leaf of ``params`` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: param_spec(tuple(x.shape), fsdp_size, min_size), params)


def named(mesh, specs):
  """A tree of PartitionSpecs as NamedShardings on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


# ----------------------------------------------------------------------------- optimizer state


def opt_state_shardings(tx, abstract_params, param_shardings_tree, mesh):
  """NamedShardings of ``tx``'s state for parameters placed at ``param_shardings_tree``.

  Args:
    tx: the optimizer.
    abstract_params: parameters or their ShapeDtypeStructs (nothing is allocated).
    param_shardings_tree: their NamedShardings.
    mesh: the mesh.
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  specs = jax.tree.map(lambda s: s.spec, param_shardings_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  return named(mesh, state_specs(abstract_state, abstract_params, specs, mesh.shape["fsdp"]))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry ``shardings`` (restore targets for orbax, inputs for ``jit.lower``)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def bytes_per_device(tree, shardings) -> int:
  """Bytes of ``tree`` (arrays or ShapeDtypeStructs) that one device holds under ``shardings`` (even splits)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    shape = s.shard_shape(tuple(x.shape))
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def describe(mesh) -> str:
  types = "explicit" if is_explicit(mesh) else "auto"
  return f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} ({types} axes)"


def spec_tree(shardings) -> Any:
  """The PartitionSpecs of a tree of NamedShardings (for printing and comparing)."""
  return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


# ----------------------------------------------------------------------------- jitted steps on a mesh


def mesh_context(mesh):
  """The context that makes ``mesh`` current while a step is traced and run (``jax.set_mesh`` or ``use_mesh``)."""
  setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
  return setter(mesh) if setter is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's trees live: the mesh and the NamedShardings of parameters, optimizer state and batch."""

  mesh: jax.sharding.Mesh
  params: Any
  opt_state: Any
  batch: NamedSharding

  @classmethod
  def build(cls, mesh, tx, abstract_params, min_size: int = MIN_SHARDED_SIZE) -> "Layout":
    """The layout of ``tx`` training ``abstract_params`` (ShapeDtypeStructs or arrays) on ``mesh``."""
    params = named(mesh, param_specs(abstract_params, mesh.shape["fsdp"], min_size))
    return cls(mesh, params, opt_state_shardings(tx, abstract_params, params, mesh), batch_sharding(mesh))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def _jit(self, fn: Callable, in_shardings, out_shardings, donate_argnums=()):
    """``jax.jit`` with these shardings, traced and run under the mesh.

    Under Explicit axes the body runs inside ``jax.sharding.auto_axes``: the model's matmuls and gathers
    over split contracting axes have no single valid result type, so inside the step the partitioner
    propagates shardings as with Auto axes, and the outputs come back with the given (explicit) types.
    """
    if is_explicit(self.mesh):
      fn = jax.sharding.auto_axes(fn, out_sharding=jax.tree.map(
          lambda s: s.spec, out_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    @functools.wraps(fn)
    def call(*args):
      with mesh_context(self.mesh):
        return jitted(*args)

    def lower(*args):
      with mesh_context(self.mesh):
        return jitted.lower(*args)

    call.lower = lower
    return call

  def jit_train(self, train: Callable):
    """``train(params, opt_state, batch) -> (params, opt_state, metrics)`` jitted with params and state donated."""
    return self._jit(train, (self.params, self.opt_state, self.batch), (self.params, self.opt_state, self.replicated()),
                     donate_argnums=(0, 1))

  def jit_eval(self, evaluate: Callable):
    """``evaluate(params, batch) -> scalars`` jitted on the mesh."""
    return self._jit(evaluate, (self.params, self.batch), self.replicated())

  def init_params(self, init: Callable[[], Any]):
    """Run ``init() -> params`` with its outputs created directly split (no full copy on one device)."""
    return self._jit(init, (), self.params)()

  def init_opt_state(self, tx, params):
    """``tx.init(params)`` created directly split."""
    return self._jit(tx.init, (self.params,), self.opt_state)(params)
