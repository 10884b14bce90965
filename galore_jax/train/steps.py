"""The jitted train and eval steps of a run, and the figures a run reports about them.

Parameters travel as plain nested dicts (``nnx.State.to_pure_dict``), so optimizer states and
checkpoints have the model's paths (``layers/0/attn/q_proj/kernel``) and nothing NNX-specific.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax.models import llama
from galore_jax.optim import guard
from galore_jax.optim.introspect import refresh_overlap, refresh_overlap_sum
from galore_jax.train import layerwise, sharding


def loss_and_tokens(model: llama.Llama, batch: dict[str, jax.Array], packed: bool) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy (fp32) over unmasked targets, and their number."""
  segments = (batch["segment_ids"], batch["positions"]) if packed else (None, None)
  logits_BSV = model(batch["inputs"], *segments)
  losses_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV.astype(jnp.float32), batch["targets"])
  mask_BS = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(losses_BS * mask_BS), jnp.sum(mask_BS)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps of a run."""

  train: Callable[..., Any]
  eval: Callable[..., Any]


def make_steps(graphdef, tx: optax.GradientTransformation, *, grad_accum: int, packed: bool,
               report_overlap: bool = False, layerwise_updates: bool = False,
               layout: sharding.Layout | None = None, skip_nonfinite: bool = False,
               skip_by: str = "select") -> Steps:
  """``train(params, opt_state, batch) -> (params, opt_state, metrics)``, donated; ``eval(params, batch)``.

  A batch of ``B`` sequences is split into ``grad_accum`` micro-batches scanned in order; the
  gradient is the per-token mean over the whole batch, as if it had been one. With
  ``layerwise_updates`` (``tx`` a :class:`~galore_jax.train.layerwise.ByLayer`) the step sweeps the
  backward pass layer by layer and updates each layer as soon as its gradient is complete.
  With a :class:`~galore_jax.train.sharding.Layout` the steps are jitted with its shardings (inputs and
  outputs) and run under its mesh; the metrics come back replicated.

  The metrics hold ``finite``: the loss and the gradient norm are both finite (a non-finite gradient entry
  makes the norm non-finite, and so does a gradient too large to square in fp32). With ``skip_nonfinite`` a
  step that is not ``finite`` changes nothing, like ``optax.apply_if_finite`` but for the whole
  ``(params, opt_state)``: weights, moments, GaLore bases and the step count keep their old values.
  ``skip_by="select"`` (the default) passes the verdict to the optimizer (``finite=``,
  :mod:`galore_jax.optim.guard`), which selects its state itself before its update reads it (or after the
  update, for a transformation that does not honour ``finite``), and selects the parameters after;
  ``"cond"`` runs the update inside a ``lax.cond``, whose operands and results get buffers of their own: at
  Llama-7B (bf16, 256 tokens) XLA:CPU's memory analysis gives the conditional gigabytes more temporaries
  than the select, which costs no more than no guard (``bench/results/skip_nonfinite-cpu.json``). The
  layerwise step needs a norm sweep before its first update for that verdict (see
  :mod:`~galore_jax.train.layerwise`) and ignores ``skip_by``.
  """

  def summed_loss(params, batch):
    return loss_and_tokens(nnx.merge(graphdef, params), batch, packed)

  def grads_of(params, batch):
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def accumulate(carry, micro_batch):
      (loss, tokens), grads = jax.value_and_grad(summed_loss, has_aux=True)(params, micro_batch)
      return jax.tree.map(jnp.add, carry, (loss, tokens, grads)), None

    zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
    (loss, tokens, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    tokens = jnp.maximum(tokens, 1.0)
    return loss / tokens, tokens, jax.tree.map(lambda g: (g / tokens).astype(g.dtype), grads)

  def update(grads, params, opt_state, finite=None):
    """The new params, state and overlap; with ``finite``, the old params and state (and a NaN overlap) where it is
    False, the state selected inside the optimizer where it honours ``finite`` (:mod:`galore_jax.optim.guard`)."""
    updates, new_opt_state = guard.update(tx, grads, opt_state, params, finite=finite)
    overlap = refresh_overlap(opt_state, new_opt_state) if report_overlap else jnp.float32(jnp.nan)
    new_params = guard.keep_unless(finite, optax.apply_updates(params, updates), params)
    return new_params, new_opt_state, guard.keep_unless(finite, overlap, jnp.float32(jnp.nan))

  def whole_tree_train(params, opt_state, batch):
    loss, tokens, grads = grads_of(params, batch)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite and skip_by == "cond":
      new_params, new_opt_state, overlap = jax.lax.cond(
          finite, update, lambda g, p, s: (p, s, jnp.float32(jnp.nan)), grads, params, opt_state)
    else:
      new_params, new_opt_state, overlap = update(grads, params, opt_state, finite if skip_nonfinite else None)
    metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite}
    if report_overlap:
      metrics["subspace_overlap"] = overlap
    return new_params, new_opt_state, metrics

  def evaluate(params, batch):
    return summed_loss(params, batch)

  if skip_by not in ("select", "cond"):
    raise ValueError(f"skip_by must be 'select' or 'cond', got {skip_by!r}")
  if layerwise_updates:
    if not isinstance(tx, layerwise.ByLayer):
      raise TypeError("layerwise_updates needs a layerwise.ByLayer optimizer (train.layerwise=True)")
    train = layerwise.make_train(graphdef, tx, grad_accum=grad_accum, packed=packed,
                                 overlap=refresh_overlap_sum if report_overlap else None, skip_nonfinite=skip_nonfinite)
  else:
    train = whole_tree_train
  if layout is not None:
    return Steps(train=layout.jit_train(train), eval=layout.jit_eval(evaluate))
  return Steps(train=jax.jit(train, donate_argnums=(0, 1)), eval=jax.jit(evaluate))


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of ``tree`` is finite (integer leaves, e.g. 8-bit states, always are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(tree)


def params_of(model: llama.Llama) -> dict:
  state = nnx.state(model, nnx.Param)
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def flops_per_token(model_cfg: llama.LlamaConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6·N for the matmuls plus the attention scores (PaLM appendix B)."""
  attention = 12 * model_cfg.num_hidden_layers * model_cfg.num_attention_heads * model_cfg.head_dim * seq_len
  return 6.0 * n_params + attention


def count_params(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
