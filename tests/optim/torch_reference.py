"""The harness every parity test against a PyTorch reference optimizer shares.

One torch weight ``W (out, in)`` (a low-rank parameter group) and a bias (a plain group) are
stepped by the reference on a gradient sequence; the same sequence goes to an optax optimizer on
``{"attn": {"kernel": Wᵀ}, "norm": bias}`` (the Flax kernel is the torch weight transposed). Both
sides report each step's parameter change in torch layout.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHAPES = {"tall": (12, 8), "wide": (8, 12), "square": (10, 10)}  # torch (out, in)


class Problem(NamedTuple):
  weight: np.ndarray  # (out, in)
  bias: np.ndarray  # (out,)
  grads: list[np.ndarray]
  bias_grads: list[np.ndarray]


def gradient_sequence(out_dim: int, in_dim: int, steps: int, seed: int = 0) -> list[np.ndarray]:
  """Gradients with a decaying spectrum, so the top-r subspace is well separated."""
  rng = np.random.default_rng(seed)
  k = min(out_dim, in_dim)
  spectrum = 2.0 ** -np.arange(k)
  grads = []
  for _ in range(steps):
    u, _ = np.linalg.qr(rng.standard_normal((out_dim, k)))
    v, _ = np.linalg.qr(rng.standard_normal((in_dim, k)))
    grads.append(((u * spectrum) @ v.T).astype(np.float32))
  return grads


def setup_problem(shape: tuple[int, int], steps: int, seed: int = 0) -> Problem:
  out_dim, in_dim = shape
  rng = np.random.default_rng(seed + 1)
  weight = rng.standard_normal((out_dim, in_dim)).astype(np.float32) * 0.1
  bias = rng.standard_normal(out_dim).astype(np.float32)
  grads = gradient_sequence(out_dim, in_dim, steps, seed)
  bias_grads = [rng.standard_normal(out_dim).astype(np.float32) for _ in range(steps)]
  return Problem(weight, bias, grads, bias_grads)


def torch_deltas(make_optimizer: Callable[[list[dict]], Any], problem: Problem, group: dict,
                 snapshot: Callable[[Any, Any], Any] | None = None):
  """Each step's ``(ΔW, Δbias)`` under the reference optimizer ``make_optimizer(param_groups)``.

  ``group`` holds the low-rank group's keys (``rank``, ``update_proj_gap``, ...). With
  ``snapshot(optimizer, weight)`` also returns its value after each step (e.g. the projector).
  """
  import torch

  w = torch.nn.Parameter(torch.tensor(problem.weight))
  b = torch.nn.Parameter(torch.tensor(problem.bias))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = make_optimizer([{"params": [b]}, {"params": [w], **group}])
  deltas, snapshots = [], []
  for g, gb in zip(problem.grads, problem.bias_grads):
    before_w, before_b = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = torch.tensor(g), torch.tensor(gb)
    opt.step()
    deltas.append(((w.detach() - before_w).numpy(), (b.detach() - before_b).numpy()))
    if snapshot is not None:
      snapshots.append(snapshot(opt, w))
  return (deltas, snapshots) if snapshot is not None else deltas


def optax_deltas(tx: optax.GradientTransformation, problem: Problem, snapshot: Callable[[Any], Any] | None = None):
  """Each step's ``(ΔW, Δbias)`` in torch layout under ``tx`` (jitted, fed the same gradients).

  With ``snapshot(state)`` also returns its value after each step (e.g. the basis used by that step).
  """
  params = {"attn": {"kernel": jnp.asarray(problem.weight.T)}, "norm": jnp.asarray(problem.bias)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  deltas, snapshots = [], []
  for g, gb in zip(problem.grads, problem.bias_grads):
    updates, state = step({"attn": {"kernel": jnp.asarray(g.T)}, "norm": jnp.asarray(gb)}, state, params)
    params = optax.apply_updates(params, updates)
    deltas.append((np.asarray(updates["attn"]["kernel"]).T, np.asarray(updates["norm"])))
    if snapshot is not None:
      snapshots.append(snapshot(state))
  return (deltas, snapshots) if snapshot is not None else deltas


def relative_error(a, b) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def subspace_residual(update: np.ndarray, basis, rank: int) -> float:
  """Fraction of a torch-layout update outside a galore-torch projector's subspace (0 = inside).

  The reference stores ``[A (out, r), B (r, in)]`` for ``full``, ``P (out, r)`` for a left and
  ``P (r, in)`` for a right projection.
  """
  if isinstance(basis, list):
    left, right = (b.numpy() for b in basis)
    inside = left @ (left.T @ update @ right.T) @ right
  else:
    p = basis.numpy()
    inside = p @ (p.T @ update) if p.shape[1] == rank else (update @ p.T) @ p
  return float(np.linalg.norm(update - inside) / np.linalg.norm(update))


def reference_basis(basis):
  """One of our :class:`~galore_jax.Basis` as the references' projectors hold it (torch tensors, torch layout).

  The input side ``Q_in [in, r]`` is a ``right`` projector ``(r, in)``, the output side ``Q_out [out, r]`` a
  ``left`` one ``(out, r)``, both a ``full`` pair ``[left, right]``.
  """
  import torch

  right = None if basis.input is None else torch.tensor(np.asarray(basis.input, np.float32).T.copy())
  left = None if basis.output is None else torch.tensor(np.asarray(basis.output, np.float32))
  if left is not None and right is not None:
    return [left, right]
  return left if left is not None else right
