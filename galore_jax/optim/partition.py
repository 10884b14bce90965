"""How an optimizer state is laid out on a mesh, given its parameters' PartitionSpecs.

The rule GaLore's state needs (bases and low-rank moments have shapes of their own, so copying the
parameter's spec would be wrong): :func:`state_specs`. It knows nothing of meshes beyond the size
of the axis that splits the parameters.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from galore_jax.optim.basis import Basis, QuantizedBasis
from galore_jax.optim.plan import path_str


def _names(path) -> list[str]:
  return path_str(path).split("/") if path else []


def _divisible(spec: tuple, shape: tuple[int, ...], fsdp_size: int) -> P:
  """``spec`` with every axis whose size the mesh axis does not divide replicated (``P()`` when none is split,
  as an unsplit parameter's spec is written)."""
  spec = [None if s is not None and shape[a] % fsdp_size else s for a, s in enumerate(spec)]
  return P(*spec) if any(s is not None for s in spec) else P()


def _low_rank_spec(shape, param_shape, spec) -> P | None:
  """The spec of a state leaf of the parameter at ``spec``: the same shape takes the same spec; a
  low-rank projection ``[..., r, n]`` or ``[..., m, r]`` keeps the spec of its unprojected axis and
  replicates the rank axis; ``None`` when the shapes do not correspond."""
  if tuple(shape) == tuple(param_shape):
    return spec
  if len(shape) != len(param_shape) or len(shape) < 2 or tuple(shape[:-2]) != tuple(param_shape[:-2]):
    return None
  lead = tuple(spec[:-2])
  if shape[-1] == param_shape[-1]:  # [..., r, n]: input side projected
    return P(*lead, None, spec[-1])
  if shape[-2] == param_shape[-2]:  # [..., m, r]: output side projected
    return P(*lead, spec[-2], None)
  return P(*lead, None, None)  # [..., r, r]: both sides


def _full_spec(spec: P, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


def state_specs(abstract_state, abstract_params, param_specs_tree, fsdp_size: int):
  """PartitionSpecs for an optimizer state, from the parameters' specs.

  Leaves are matched to parameters by the longest suffix of their key path that is a parameter's
  path (``.../mu/layers/0/mlp/up_proj/kernel``; GaLore bases by their ``{path: Basis}`` key):
  parameter-shaped leaves (full-rank moments) take the parameter's spec; GaLore bases
  ``[..., m, r]`` (input side) and ``[..., n, r]`` (output side) take the spec of the parameter's
  axis -2 or -1 on their axis -2 and replicate the rank axis; low-rank moments ``[..., r, n]`` or
  ``[..., m, r]`` keep the spec of their unprojected axis. When the parameter's rule splits the larger
  axis (as the training app's does) and GaLore's ``std`` rule projects the smaller one, the
  moments (``2·r·n`` values) are split and the bases (``m·r``) replicated. Everything else
  (counts, schedules, 8-bit blocks, factored moments) is replicated, and so is any axis the
  ``fsdp`` size does not divide. The rule assumes the default dimension numbers (matrix = last
  two axes); other layouts are replicated.

  Args:
    abstract_state: the state's tree, e.g. ``jax.eval_shape(tx.init, params)``.
    abstract_params: the parameters (arrays or ShapeDtypeStructs).
    param_specs_tree: their PartitionSpecs.
    fsdp_size: size of the ``fsdp`` mesh axis.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_specs = jax.tree_util.tree_structure(abstract_params).flatten_up_to(param_specs_tree)
  table = {path_str(k): (tuple(x.shape), _full_spec(s, len(x.shape))) for (k, x), s in zip(flat_params, flat_specs)}

  def lookup(names):
    for i in range(len(names)):
      key = "/".join(names[i:])
      if key in table:
        return table[key]
    return None

  def leaf_spec(path, x):
    if isinstance(x, Basis):
      found = lookup(_names(path))
      return Basis(*(None if q is None else _basis_spec(q, found, side) for side, q in enumerate(x)))
    if x is None or not hasattr(x, "shape") or len(x.shape) == 0:
      return P()
    found = lookup(_names(path))
    if found is None:
      return P()
    spec = _low_rank_spec(x.shape, *found)
    return P() if spec is None else _divisible(tuple(spec), x.shape, fsdp_size)

  def _basis_spec(q, found, side):
    if isinstance(q, QuantizedBasis):  # 4-bit codes: d·r/2 bytes, replicated like a small state
      return QuantizedBasis(P(), P(), P())
    if found is None:
      return P()
    param_shape, spec = found
    axis = -2 if side == 0 else -1  # input basis [..., m, r] ↔ param axis -2; output [..., n, r] ↔ axis -1
    if len(q.shape) != len(param_shape) or q.shape[:-2] != param_shape[:-2] or q.shape[-2] != param_shape[axis]:
      return P()
    # Not split when the parameter is split on its other axis: then Q [m, r] @ R [r, n@fsdp] needs no
    # communication (and is a legal type under Explicit axes, where [m@fsdp, r] @ [r, n@fsdp] is not).
    return _divisible((*spec[:-2], spec[axis], None), q.shape, fsdp_size)

  return jax.tree_util.tree_map_with_path(leaf_spec, abstract_state, is_leaf=lambda x: isinstance(x, Basis))
