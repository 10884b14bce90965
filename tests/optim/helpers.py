"""What the optimizer tests share: gradients with known spectra, subspace checks, jaxpr inspection."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import Basis


def low_rank_grad(key, shape, rank=3):
  """A gradient of exactly `rank` with well separated singular values."""
  *batch, m, n = shape
  k1, k2 = jax.random.split(key)
  u = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, rank)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, rank)))[0]
  s = 2.0 ** -jnp.arange(rank)
  return (u * s) @ jnp.swapaxes(v, -1, -2)


def gapped_grad(key, shape, rank, gap=100.0):
  """A full-rank matrix whose top-`rank` singular values are `gap`× above a decaying tail."""
  *batch, m, n = shape
  d = min(m, n)
  k1, k2 = jax.random.split(key)
  u = jnp.linalg.qr(jax.random.normal(k1, (*batch, m, d)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (*batch, n, d)))[0]
  s = jnp.where(jnp.arange(d) < rank, gap * (1.0 + jnp.arange(d, 0, -1) / d), 1.0 / (1.0 + jnp.arange(d)))
  return (u * s) @ jnp.swapaxes(v, -1, -2)


def projector(q):
  return q @ jnp.swapaxes(q, -1, -2)


def assert_orthonormal(q, atol=1e-5):
  eye = np.broadcast_to(np.eye(q.shape[-1]), (*q.shape[:-2], q.shape[-1], q.shape[-1]))
  np.testing.assert_allclose(jnp.swapaxes(q, -1, -2) @ q, eye, atol=atol)


def assert_same_subspace(a: Basis, b: Basis, atol=1e-3):
  for qa, qb in zip(a, b):
    assert (qa is None) == (qb is None)
    if qa is not None:
      np.testing.assert_allclose(projector(qa), projector(qb), atol=atol)


def mixed_params():
  """A stacked square kernel, a square one, a wide and a tall one, and a norm scale."""
  return {
      "attn": {"q": jnp.zeros((2, 12, 12)), "k": jnp.zeros((12, 12))},
      "mlp": {"up": jnp.zeros((12, 20)), "down": jnp.zeros((20, 12))},
      "norm": jnp.zeros(12),
  }


def gapped_grads(t, params):
  """Step ``t``'s gradients for ``params``: rank-3-gapped matrices, normal vectors."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(t), len(leaves))
  return treedef.unflatten([
      gapped_grad(k, x.shape, rank=3) if x.ndim >= 2 else jax.random.normal(k, x.shape)
      for k, x in zip(keys, leaves)
  ])


def sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (list, tuple)) else [value]:
      if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr
      elif hasattr(v, "eqns"):
        yield v


def primitive_names(jaxpr, inside_cond=False, found=None):
  """``(primitive name, inside a lax.cond)`` of every equation of ``jaxpr`` and its sub-jaxprs."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    found.append((eqn.primitive.name, inside_cond))
    for sub in sub_jaxprs(eqn):
      primitive_names(sub, inside_cond or eqn.primitive.name == "cond", found)
  return found


def operand_shapes(jaxpr, primitive: str, found=None):
  """Shapes of the first operand of every ``primitive`` in ``jaxpr`` and its sub-jaxprs (branches, loop bodies)."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.append(tuple(eqn.invars[0].aval.shape))
    for sub in sub_jaxprs(eqn):
      operand_shapes(sub, primitive, found)
  return found


def dot_precisions(jaxpr, found=None):
  """``(output shape, exact)`` of every ``dot_general`` in ``jaxpr``; exact = both operands at ``HIGHEST``."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      precision = eqn.params.get("precision")
      exact = isinstance(precision, tuple) and all(p == jax.lax.Precision.HIGHEST for p in precision)
      found.append((tuple(eqn.outvars[0].aval.shape), exact))
    for sub in sub_jaxprs(eqn):
      dot_precisions(sub, found)
  return found


def gpu_solver_calls(fn, *args) -> list[tuple[str, int]]:
  """``(target, batch dims)`` of every custom call in ``fn(*args)``'s StableHLO lowered for CUDA (``jax.export``,
  no GPU needed); asserts that no custom call runs in a loop (a per-matrix loop of solvers is the CPU lowering
  only; a loop of elementwise work, as 8-bit Adam's chunks, may be there)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*abstract).mlir_module()
  assert not any(reaches_custom_call(loop, text) for loop in regions(text, r"stablehlo\.while", 2))
  calls = re.findall(r'stablehlo\.custom_call @(\w+)\(.*?num_batch_dims = "(\d+)"', text)
  assert len(calls) == text.count("stablehlo.custom_call"), text
  return [(target, int(dims)) for target, dims in calls]


def regions(mlir: str, opening: str, count: int = 1) -> list[str]:
  """The text of every op matching ``opening`` in ``mlir`` through the end of its ``count`` brace-delimited
  regions (a ``stablehlo.while``: ``cond { ... } do { ... }``; a ``func.func``: its body)."""
  def region_end(start: int) -> int:  # after the brace closing the region opened at or after start
    depth, i = 0, mlir.index("{\n", start)  # a region's brace ends its line; an attribute dict's does not
    while True:
      depth += {"{": 1, "}": -1}.get(mlir[i], 0)
      i += 1
      if depth == 0:
        return i

  found = []
  for match in re.finditer(opening, mlir):
    end = match.start()
    for _ in range(count):
      end = region_end(end)
    found.append(mlir[match.start():end])
  return found


def reaches_custom_call(code: str, mlir: str, seen: frozenset = frozenset()) -> bool:
  """Whether ``code`` holds a custom call, directly or in a function of ``mlir`` it calls."""
  if "stablehlo.custom_call" in code:
    return True
  for name in set(re.findall(r"call @([\w.]+)\(", code)) - seen:
    (body,) = regions(mlir, r"func\.func \w+ @" + re.escape(name) + r"\(")
    if reaches_custom_call(body, mlir, seen | {name}):
      return True
  return False
