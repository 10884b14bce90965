"""Layerwise updates: each decoder layer is updated as soon as its gradient is complete.

The GaLore paper reaches 7B in 22 GB partly by updating weights inside the backward pass, so that the
full gradient tree never exists. Its hooks update per micro-batch (gradient accumulation is wrong) and
cannot clip by the global norm. Here the backward pass is swept layer by layer, top to bottom:

1. forward: the input of every layer is kept for every micro-batch (``[b, S, D]`` each, small);
2. head: the loss, the head's gradient (final norm and an untied lm_head) and the cotangent at the
   last layer's output, per micro-batch; the head is updated at once, before the sweep;
3. for ``l = L-1 … 0``: the layer is recomputed and differentiated for each micro-batch in turn, its
   parameter gradient ``G_l`` summed over the micro-batches (the exact accumulated gradient), then
   consumed at once by the layer's own optimizer state, and freed before layer ``l-1`` starts
   (``optimization_barrier`` fixes that order for XLA);
4. the embedding (the "rest" group; with tied embeddings also the final norm) last.

With ``grad_clip > 0`` the clip factor needs the global norm before any update, so a first sweep
computes only the per-group norms; the second pass starts from the loss cotangent scaled by the clip
factor (gradients are linear in it), so it yields the clipped gradients directly: one more backward
pass, correct clipping, and still one group's gradient at a time.
Skipping a non-finite step (``skip_nonfinite``) needs its verdict before the first update, so the
norm sweep runs then even without clipping, and the second pass starts from the cotangent times 1 (finite)
or 0 (not): every group's update is a select between its new and old values, made as the group is
updated, so no old copy of the model outlives its group.
The optimizer state is one state per layer plus one for the head and one for the rest (:func:`by_layer`);
every GaLore leaf is refreshed, projected and updated exactly as in the whole-tree step (the per-leaf
schedule is the same; ``stagger`` offsets and randomized-refresh keys are drawn per group).

Peak memory beyond weights and optimizer state: the largest group's gradient (a layer's, the head's or
the embedding's) and the boundary activations, instead of a full gradient tree. Micro-batches are
unrolled (a Python loop): inside ``lax.scan`` loops XLA kept every layer's buffers live at once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax.models import llama


class ByLayer(NamedTuple):
  """An optax-compatible transformation with one ``inner`` state per decoder layer, one for the head, one for the rest.

  ``update`` on a whole gradient tree clips by the global norm, then updates every group: the
  reference the layerwise step must equal. The layerwise step itself uses ``inner`` and ``grad_clip``.
  """

  init: Callable[[Any], Any]
  update: Callable[..., Any]
  inner: optax.GradientTransformation
  grad_clip: float


HEAD = ("final_norm", "lm_head")


def split_layers(tree: dict) -> tuple[dict, dict]:
  """``(layers, rest)`` of a Llama parameter (or gradient) dict."""
  return tree["layers"], {k: v for k, v in tree.items() if k != "layers"}


def split_groups(tree: dict) -> tuple[dict, dict, dict]:
  """``(layers, head, rest)``: the head (final norm and an untied lm_head) is complete right after the loss,
  the rest (the embedding) only at the bottom; with tied embeddings the head group is empty."""
  layers, others = split_layers(tree)
  head_keys = HEAD if "lm_head" in others else ()
  return (layers, {k: v for k, v in others.items() if k in head_keys},
          {k: v for k, v in others.items() if k not in head_keys})


def by_layer(inner: optax.GradientTransformation, grad_clip: float = 0.0) -> ByLayer:
  """``inner`` applied per decoder layer (``params['layers'][i]``), to the head and to the other parameters.

  The state is ``{"layers": {i: state}, "head": state, "rest": state}`` (no ``head`` with tied embeddings).
  """

  def init(params):
    layers, head, rest = split_groups(params)
    state = {"layers": {k: inner.init(p) for k, p in layers.items()}, "rest": inner.init(rest)}
    return {**state, "head": inner.init(head)} if head else state

  def update(grads, state, params=None):
    if grad_clip > 0:
      grads = clip(grads, jnp.sqrt(_sum_squares(grads)), grad_clip)
    layer_grads, head_grads, rest_grads = split_groups(grads)
    layer_params, head_params, rest_params = split_groups(params) if params is not None else ({}, None, None)
    updates, new_state = {}, {"layers": {}}
    for k, g in layer_grads.items():
      updates[k], new_state["layers"][k] = inner.update(g, state["layers"][k], layer_params.get(k))
    rest_updates, new_state["rest"] = inner.update(rest_grads, state["rest"], rest_params)
    head_updates = {}
    if head_grads:
      head_updates, new_state["head"] = inner.update(head_grads, state["head"], head_params)
    return {**rest_updates, **head_updates, "layers": updates}, new_state

  return ByLayer(init, update, inner, float(grad_clip))


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
  """The factor of ``optax.clip_by_global_norm``: 1 below ``max_norm``, else ``max_norm / norm``."""
  return jnp.where(norm < max_norm, jnp.float32(1), max_norm / norm)


def clip(tree, norm: jax.Array, max_norm: float):
  """``optax.clip_by_global_norm`` with the norm given: unchanged below ``max_norm``, else scaled onto it."""
  factor = clip_factor(norm, max_norm)
  return jax.tree.map(lambda t: (t * factor.astype(t.dtype)).astype(t.dtype), tree)


def _sum_squares(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def make_train(graphdef, tx: ByLayer, *, grad_accum: int, packed: bool,
               overlap: Callable[[Any, Any], jax.Array] | None = None, skip_nonfinite: bool = False) -> Callable:
  """``train(params, opt_state, batch) -> (params, opt_state, metrics)`` with layerwise updates (not jitted).

  The metrics are those of the whole-tree step: ``loss`` (per-token mean), ``tokens``, ``grad_norm``
  (before clipping), ``finite`` (loss and norm finite) and, with ``overlap``, ``subspace_overlap =
  overlap(old_state, new_state)``. With ``skip_nonfinite`` a step that is not ``finite`` changes nothing.
  """
  inner, grad_clip = tx.inner, tx.grad_clip

  def train(params, opt_state, batch):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    if cfg.scan_layers:
      raise ValueError("layerwise updates need model.scan_layers=False (one parameter tree per layer)")
    block_def, keys = nnx.graphdef(model.layers[0]), list(params["layers"])  # keys[i] is layer i
    n_layers = len(keys)
    _, head_params, rest_params = split_groups(params)
    other_params = {**head_params, **rest_params}

    def rest_model(others):
      return nnx.merge(graphdef, {**other_params, **others, "layers": params["layers"]})

    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def block(p, x_BSD, mb):
      return nnx.merge(block_def, p)(x_BSD, *mb["attention_inputs"])[0]

    def head_loss(rest, x_BSD, mb):
      logits_BSV = rest_model(rest).head(x_BSD)
      losses_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, mb["targets"])
      return jnp.sum(losses_BS * mb["loss_mask"].astype(jnp.float32))

    # Micro-batches are a Python loop, not a scan: XLA's while loops made every layer's buffers live at once.
    micro = [jax.tree.map(lambda x, k=k: x[k], micro) for k in range(grad_accum)]
    for mb in micro:  # RoPE tables and mask once per micro-batch, shared by every layer and both passes
      segments = (mb["segment_ids"], mb["positions"]) if packed else (None, None)
      mb["attention_inputs"] = llama.attention_inputs(cfg, mb["inputs"].shape, *segments)

    # 1. forward, keeping each layer's input for every micro-batch
    xs = [[rest_model(rest_params).embed(mb["inputs"]) for mb in micro]]
    for i in range(n_layers):
      xs.append([block(params["layers"][keys[i]], x, mb) for x, mb in zip(xs[-1], micro)])

    def head_pass(seed):
      """The loss, the non-layer gradients from the head and the cotangent at the top, all times ``seed``."""
      loss, grads, dx_top = jnp.float32(0), jax.tree.map(jnp.zeros_like, other_params), []
      for x_BSD, mb in zip(xs[-1], micro):
        loss_k, pullback = jax.vjp(lambda o, x, mb=mb: head_loss(o, x, mb), other_params, x_BSD)
        d_other, dx = pullback(seed.astype(loss_k.dtype))
        loss, grads = loss + loss_k, jax.tree.map(jnp.add, grads, d_other)
        dx_top.append(dx)
      return loss, grads, dx_top

    def layer_grad(i, dx_next):
      """The accumulated gradient of layer i (summed loss) and the cotangent at its input."""
      p = params["layers"][keys[i]]
      grad, dxs = jax.tree.map(jnp.zeros_like, p), []
      for x_BSD, dy, mb in zip(xs[i], dx_next, micro):
        _, pullback = jax.vjp(lambda q, x, mb=mb: block(q, x, mb), p, x_BSD)
        dp, dx = pullback(dy)
        grad = jax.tree.map(jnp.add, grad, dp)
        dxs.append(dx)
      return grad, dxs

    def rest_grad(dx_bottom, from_head):
      grad = from_head
      for dy, mb in zip(dx_bottom, micro):
        _, pullback = jax.vjp(lambda r, mb=mb: rest_model(r).embed(mb["inputs"]), rest_params)
        grad = jax.tree.map(jnp.add, grad, pullback(dy)[0])
      return grad

    def mean(g):
      return jax.tree.map(lambda x: (x / tokens).astype(x.dtype), g)

    def sweep(consume, dx, from_head):
      """Layers top to bottom, then the rest group; ``consume(group, grad)`` runs as soon as grad exists."""
      outputs = {}
      for i in reversed(range(n_layers)):
        grad, dx = layer_grad(i, dx)
        outputs[keys[i]], dx = jax.lax.optimization_barrier((consume(keys[i], mean(grad)), dx))
      return outputs, consume("rest", mean(rest_grad(dx, from_head)))

    def head_and_rest(grads):
      return {k: grads[k] for k in head_params}, {k: grads[k] for k in rest_params}

    # 2. head: loss, the head's gradient, the cotangent at the top
    loss, from_head, dx_top = head_pass(jnp.float32(1))
    head_grads, rest_from_head = head_and_rest(from_head)
    head_sq = _sum_squares(mean(head_grads))
    finite = None  # known before the first update only when it is needed: clipping or skipping
    if grad_clip > 0 or skip_nonfinite:
      layer_sq, rest_sq = sweep(lambda group, g: _sum_squares(g), dx_top, rest_from_head)
      norm = jnp.sqrt(sum(layer_sq.values()) + rest_sq + head_sq)
      finite = jnp.isfinite(loss) & jnp.isfinite(norm)
      # Clipping scales every gradient by one factor and gradients are linear in the cotangent, so the
      # second pass starts from the loss cotangent scaled by it; skipping scales by 0 (the update is
      # discarded anyway). A factor XLA cannot prove to be 1 also keeps the two sweeps apart: merged,
      # they kept every G_l alive until the norm was known.
      factor = clip_factor(norm, grad_clip) if grad_clip > 0 else jnp.float32(1)
      _, from_head, dx_top = head_pass(jnp.where(finite, factor, 0.0) if skip_nonfinite else factor)
      head_grads, rest_from_head = head_and_rest(from_head)

    def update(group, g):
      named = group in ("head", "rest")
      p = {"head": head_params, "rest": rest_params}[group] if named else params["layers"][group]
      s = opt_state[group] if named else opt_state["layers"][group]
      u, new_s = inner.update(g, s, p)
      new_p = optax.apply_updates(p, u)
      if skip_nonfinite:
        new_p, new_s = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (new_p, new_s), (p, s))
      return new_p, new_s, _sum_squares(g)

    new_head, new_head_state = {}, None
    if head_params:  # updated before the sweep starts, so the head's gradient is gone by then
      (new_head, new_head_state, _), dx_top = jax.lax.optimization_barrier((update("head", mean(head_grads)), dx_top))
    new_layers, (new_rest, new_rest_state, rest_sq) = sweep(update, dx_top, rest_from_head)
    if finite is None:
      norm = jnp.sqrt(sum(v[2] for v in new_layers.values()) + rest_sq + head_sq)
      finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    new_params = {**new_rest, **new_head, "layers": {k: new_layers[k][0] for k in keys}}
    new_state = {"layers": {k: new_layers[k][1] for k in keys}, "rest": new_rest_state}
    if head_params:
      new_state["head"] = new_head_state
    metrics = {"loss": loss / tokens, "tokens": tokens, "grad_norm": norm, "finite": finite}
    if overlap is not None:
      metrics["subspace_overlap"] = overlap(opt_state, new_state)
    return new_params, new_state, metrics

  return train
