"""The refresh's decompositions on batches: the same factors as one call per matrix, on CPU no batched LAPACK call
(a batched one can park every XLA:CPU pool thread, which hung the Gram refresh on an 8-device mesh), and on GPU
one batched cuSOLVER call (the GPU program is lowered here, on a CPU, with ``jax.export``)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gpu_solver_calls

from galore_jax.optim import linalg

BATCH = (2, 3)
DECOMPOSITIONS = {
    "svd": lambda a: linalg.svd(a),
    "svd_jacobi": lambda a: linalg.svd(a, "jacobi"),
    "svd_qr": lambda a: linalg.svd(a, "qr"),
    "eigh": lambda a: linalg.eigh(a @ jnp.swapaxes(a, -1, -2)),
    "eigh_jacobi": lambda a: linalg.eigh(a @ jnp.swapaxes(a, -1, -2), "jacobi"),
    "qr": linalg.qr,
    "lu_basis": lambda a: (linalg.lu_basis(a),),
}


def lapack_operand_shapes(fn, x) -> list[tuple[int, ...]]:
  """The operand shape of every LAPACK custom call in ``fn``'s compiled CPU program."""
  text = jax.jit(fn).lower(x).compile().as_text()
  calls = re.findall(r'custom_call_target="lapack_\w+".*?operand_layout_constraints=\{\w+\[([\d,]*)\]', text)
  return [tuple(int(d) for d in dims.split(",")) for dims in calls]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the per-matrix loop is the CPU lowering")
@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
def test_cpu_lowering_calls_lapack_one_matrix_at_a_time(name):
  x = jnp.ones((*BATCH, 6, 4))
  shapes = lapack_operand_shapes(DECOMPOSITIONS[name], x)
  assert shapes and all(len(s) == 2 for s in shapes), shapes


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
def test_batched_factors_equal_one_call_per_matrix(name):
  x = jax.random.normal(jax.random.key(0), (*BATCH, 6, 4))
  batched = jax.jit(DECOMPOSITIONS[name])(x)
  for index in np.ndindex(*BATCH):
    single = DECOMPOSITIONS[name](x[index])
    for b, s in zip(batched, single):
      np.testing.assert_allclose(b[index], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
def test_gpu_lowering_keeps_the_batch_in_one_cusolver_call(name):
  calls = gpu_solver_calls(DECOMPOSITIONS[name], jnp.ones((*BATCH, 6, 4)))
  assert calls and all(target.startswith("cu") and dims == len(BATCH) for target, dims in calls), calls


def test_gpu_solver_calls_refuses_a_solver_in_a_loop_and_allows_other_loops():
  one_at_a_time = lambda x: jax.lax.map(lambda a: jnp.linalg.eigh(a)[0], x)  # the solver in a called function
  with pytest.raises(AssertionError):
    gpu_solver_calls(one_at_a_time, jnp.ones((3, 8, 8)))
  elementwise_loop = lambda x: (jax.lax.fori_loop(0, 3, lambda i, c: c * 2, x), jnp.linalg.eigh(x)[0])
  assert gpu_solver_calls(elementwise_loop, jnp.ones((8, 8))) == [("cusolver_syevd_ffi", 0)]


def test_one_matrix_is_not_wrapped_in_a_loop():
  jaxpr = jax.make_jaxpr(linalg.eigh)(jnp.eye(4))
  assert not any(e.primitive.name in ("scan", "while", "platform_index") for e in jaxpr.jaxpr.eqns)
