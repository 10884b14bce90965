"""Layerwise updates: each decoder layer is updated as soon as its gradient is complete.

The GaLore paper reaches 7B in 22 GB partly by updating weights inside the backward pass, so that the
full gradient tree never exists. Its hooks update per micro-batch (gradient accumulation is wrong) and
cannot clip by the global norm. Here the backward pass is swept layer by layer, top to bottom:

1. forward: the input of every layer is kept for every micro-batch (``[b, S, D]`` each, small);
2. head: the loss, the head's gradient (final norm and an untied lm_head) and the cotangent at the
   last layer's output, per micro-batch; the head is updated at once, before the sweep;
3. for ``l = L-1 … 0``: the layer is recomputed and differentiated for each micro-batch in turn, its
   parameter gradient ``G_l`` summed over the micro-batches (the exact accumulated gradient), then
   consumed at once by the layer's own optimizer state, and freed before layer ``l-1`` starts;
4. the embedding (the "rest" group; with tied embeddings also the final norm) last.

With ``grad_clip > 0`` the clip factor needs the global norm before any update, so a first sweep
computes only the per-group norms; the second pass starts from the loss cotangent scaled by the clip
factor (gradients are linear in it), so it yields the clipped gradients directly: one more backward
pass, correct clipping, and still one group's gradient at a time.
Skipping a non-finite step (``skip_nonfinite``) needs its verdict before the first update, so the
norm sweep runs then even without clipping: every group's update is a select between its new and old
values, made as the group is updated (its state inside the optimizer, :mod:`galore_jax.optim.guard`), so
no old copy of the model outlives its group.

The optimizer state is one state per layer plus one for the head and one for the rest (:func:`by_layer`);
every GaLore leaf is refreshed, projected and updated exactly as in the whole-tree step (the per-leaf
schedule is the same; ``stagger`` offsets and randomized-refresh keys are drawn per layer).

Two layouts of the layers (:class:`Layers`), as the model's ``scan_layers``:

* unrolled (``params['layers'][i]``): the sweep is a Python loop, one copy of the layer's backward pass
  and optimizer update per layer in the program (``optimization_barrier`` fixes the order for XLA);
* stacked (kernels ``[L, in, out]``): the sweep is one ``lax.scan`` in reverse whose carry holds the
  cotangent, the stacked parameters and the stacked optimizer state; each iteration reads layer ``l``'s
  slice, updates it and writes it back in place (``dynamic_update_slice`` on the carry). The program holds
  one layer's backward pass and update whatever the depth, so it compiles in about the time of a
  whole-tree step. The layer state is the unrolled one stacked on a leading layer axis, like the
  parameters: ``state['layers']`` leaf ``[L, ...]`` is ``[state['layers'][i] for i]`` stacked.

Peak memory beyond weights and optimizer state: the largest group's gradient (a layer's, the head's or
the embedding's) and the boundary activations, instead of a full gradient tree. Micro-batches are
unrolled (a Python loop): inside ``lax.scan`` loops XLA kept every layer's buffers live at once.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from galore_jax.models import llama
from galore_jax.optim import NothingTargetedWarning
from galore_jax.optim import guard


class ByLayer(NamedTuple):
  """An optax-compatible transformation with one ``inner`` state per decoder layer, one for the head, one for the rest.

  ``update`` on a whole gradient tree clips by the global norm, then updates every group: the
  reference the layerwise step must equal. The layerwise step itself uses ``inner`` and ``grad_clip``.
  ``stacked``: the layers' parameters are stacked on a leading axis (``scan_layers``).
  """

  init: Callable[[Any], Any]
  update: Callable[..., Any]
  inner: optax.GradientTransformation
  grad_clip: float
  stacked: bool = False


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


def by_layer(inner: optax.GradientTransformation, grad_clip: float = 0.0, stacked: bool = False) -> ByLayer:
  """``inner`` applied per decoder layer, to the head and to the other parameters.

  The state is ``{"layers": ..., "head": state, "rest": state}`` (no ``head`` with tied embeddings). With
  unrolled layers ``state["layers"]`` is ``{i: state}``, one per ``params['layers'][i]``; with ``stacked``
  layers (kernels ``[L, in, out]``) it is one state whose every leaf has a leading layer axis, slice ``i``
  being layer ``i``'s own state (each layer's GaLore step count, bases and moments, as unrolled).
  """

  def init(params):
    layers, head, rest = split_groups(params)
    layer_state = jax.vmap(inner.init)(layers) if stacked else {k: inner.init(p) for k, p in layers.items()}
    with warnings.catch_warnings():  # the head and the embedding hold no projected matrix by design
      warnings.simplefilter("ignore", NothingTargetedWarning)
      state = {"layers": layer_state, "rest": inner.init(rest)}
      return {**state, "head": inner.init(head)} if head else state

  def update_layers(grads, state, params):
    if stacked:  # layer by layer (a scan over the leading axis), each with its own state
      return jax.lax.map(lambda a: inner.update(*a), (grads, state, params))
    out = {k: inner.update(g, state[k], None if params is None else params[k]) for k, g in grads.items()}
    return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}

  def update(grads, state, params=None):
    if grad_clip > 0:
      grads = clip(grads, jnp.sqrt(_sum_squares(grads)), grad_clip)
    layer_grads, head_grads, rest_grads = split_groups(grads)
    layer_params, head_params, rest_params = split_groups(params) if params is not None else (None, None, None)
    updates, new_state = {}, {}
    updates["layers"], new_state["layers"] = update_layers(layer_grads, state["layers"], layer_params)
    rest_updates, new_state["rest"] = inner.update(rest_grads, state["rest"], rest_params)
    head_updates = {}
    if head_grads:
      head_updates, new_state["head"] = inner.update(head_grads, state["head"], head_params)
    return {**rest_updates, **head_updates, "layers": updates["layers"]}, new_state

  return ByLayer(init, update, inner, float(grad_clip), bool(stacked))


def clip_factor(norm: jax.Array, max_norm: float) -> jax.Array:
  """The factor of ``optax.clip_by_global_norm``: 1 below ``max_norm``, else ``max_norm / norm``."""
  return jnp.where(norm < max_norm, jnp.float32(1), max_norm / norm)


def clip(tree, norm: jax.Array, max_norm: float):
  """``optax.clip_by_global_norm`` with the norm given: unchanged below ``max_norm``, else scaled onto it."""
  factor = clip_factor(norm, max_norm)
  return jax.tree.map(lambda t: (t * factor.astype(t.dtype)).astype(t.dtype), tree)


def _sum_squares(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Layers:
  """How the sweep reads, writes and visits the layers of a tree whose ``layers`` entry has ``n`` of them.

  Unrolled: a layer tree is ``{key: layer}`` and ``i`` a Python int. Stacked: every leaf has a leading
  layer axis and ``i`` may be traced; reads and writes are dynamic slices.
  """

  n: int
  keys: tuple[str, ...] | None  # unrolled: keys[i] is layer i; None when stacked

  @property
  def stacked(self) -> bool:
    return self.keys is None

  def get(self, tree, i):
    if self.stacked:
      return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)
    return tree[self.keys[i]]

  def add(self, tree, i, delta):
    """``tree`` with ``delta`` added to layer ``i`` (stacked: added in place, so that XLA reads no separate copy
    of the old slice; a leaf whose ``delta`` has another dtype is rounded as ``optax.apply_updates`` rounds)."""
    if not self.stacked:
      return {**tree, self.keys[i]: optax.apply_updates(tree[self.keys[i]], delta)}

    def add_leaf(x, d):
      if d.dtype == x.dtype:
        return x.at[i].add(d)
      old = jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
      return jax.lax.dynamic_update_index_in_dim(x, optax.apply_updates(old, d), i, 0)

    return jax.tree.map(add_leaf, tree, delta)

  def set(self, tree, i, value):
    if self.stacked:
      return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), i, 0), tree, value)
    return {**tree, self.keys[i]: value}

  def forward(self, block: Callable, params, x0):
    """``(top, inputs)``: the output of the last layer and every layer's input (``get(inputs, i)``)."""
    if self.stacked:
      return jax.lax.scan(lambda x, p: (block(p, x), x), x0, params)
    inputs, x = {}, x0
    for i, k in enumerate(self.keys):
      inputs[k], x = x, block(params[k], x)
    return x, inputs

  def sweep(self, body: Callable, carry):
    """``carry = body(i, carry)`` for ``i = n-1 … 0``: a reverse ``lax.scan``, or a loop with barriers."""
    if self.stacked:
      return jax.lax.scan(lambda c, i: (body(i, c), None), carry, jnp.arange(self.n), reverse=True)[0]
    for i in reversed(range(self.n)):
      carry = jax.lax.optimization_barrier(body(i, carry))
    return carry


def layers_of(params: dict, stacked: bool) -> Layers:
  layers = params["layers"]
  if stacked:
    return Layers(n=jax.tree.leaves(layers)[0].shape[0], keys=None)
  return Layers(n=len(layers), keys=tuple(layers))


def make_train(graphdef, tx: ByLayer, *, grad_accum: int, packed: bool,
               overlap: Callable[[Any, Any], tuple[jax.Array, jax.Array]] | None = None,
               skip_nonfinite: bool = False) -> Callable:
  """``train(params, opt_state, batch) -> (params, opt_state, metrics)`` with layerwise updates (not jitted).

  The metrics are those of the whole-tree step: ``loss`` (per-token mean), ``tokens``, ``grad_norm``
  (before clipping), ``finite`` (loss and norm finite) and, with ``overlap(old, new) -> (sum, count)``
  (:func:`~galore_jax.optim.introspect.refresh_overlap_sum`), ``subspace_overlap``: the mean over every
  group's replaced bases (NaN when none was). Each group's part is taken as soon as it is updated, so no
  group's old bases outlive its update (kept for one metric at the end, they were a second set of bases).
  With ``skip_nonfinite`` a step that is not ``finite`` changes nothing.
  """
  report_overlap = overlap is not None
  no_overlap = lambda old, new: (jnp.float32(0), jnp.float32(0))
  overlap = overlap or no_overlap
  inner, grad_clip = tx.inner, tx.grad_clip

  def train(params, opt_state, batch):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    if cfg.scan_layers != tx.stacked:
      raise ValueError(f"model.scan_layers={cfg.scan_layers} but the optimizer was built with "
                       f"by_layer(stacked={tx.stacked}): they must agree")
    block_def = nnx.graphdef(model.layers if cfg.scan_layers else model.layers[0])
    layers = layers_of(params, cfg.scan_layers)
    layer_params, head_params, rest_params = split_groups(params)
    other_params = {**head_params, **rest_params}

    def rest_model(others):
      return nnx.merge(graphdef, {**other_params, **others, "layers": layer_params})

    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    # Micro-batches are a Python loop, not a scan: XLA's while loops made every layer's buffers live at once.
    micro = [jax.tree.map(lambda x, k=k: x[k], micro) for k in range(grad_accum)]
    for mb in micro:  # RoPE tables and mask once per micro-batch, shared by every layer and both passes
      segments = (mb["segment_ids"], mb["positions"]) if packed else (None, None)
      mb["attention_inputs"] = llama.attention_inputs(cfg, mb["inputs"].shape, *segments)

    def block(p, x_BSD, mb):
      return nnx.merge(block_def, p)(x_BSD, *mb["attention_inputs"])[0]

    def blocks(p, xs):  # one layer on every micro-batch
      return [block(p, x, mb) for x, mb in zip(xs, micro)]

    def head_loss(rest, x_BSD, mb):
      logits_BSV = rest_model(rest).head(x_BSD)
      losses_BS = optax.softmax_cross_entropy_with_integer_labels(logits_BSV, mb["targets"])
      return jnp.sum(losses_BS * mb["loss_mask"].astype(jnp.float32))

    # 1. forward, keeping each layer's input for every micro-batch
    top, inputs = layers.forward(blocks, layer_params, [rest_model(rest_params).embed(mb["inputs"]) for mb in micro])

    def head_pass(seed):
      """The loss, the non-layer gradients from the head and the cotangent at the top, all times ``seed``."""
      loss, grads, dx_top = jnp.float32(0), jax.tree.map(jnp.zeros_like, other_params), []
      for x_BSD, mb in zip(top, micro):
        loss_k, pullback = jax.vjp(lambda o, x, mb=mb: head_loss(o, x, mb), other_params, x_BSD)
        d_other, dx = pullback(seed.astype(loss_k.dtype))
        loss, grads = loss + loss_k, jax.tree.map(jnp.add, grads, d_other)
        dx_top.append(dx)
      return loss, grads, dx_top

    def layer_grad(p, xs, dx_next):
      """A layer's accumulated gradient (summed loss) and the cotangent at its input, per micro-batch."""
      grad, dxs = jax.tree.map(jnp.zeros_like, p), []
      for x_BSD, dy, mb in zip(xs, dx_next, micro):
        _, pullback = jax.vjp(lambda q, x, mb=mb: block(q, x, mb), p, x_BSD)
        dp, dx = pullback(dy)
        grad = jax.tree.map(jnp.add, grad, dp)
        dxs.append(dx)
      return grad, dxs

    def rest_grad(dx_bottom, from_head):
      grad = from_head
      for dy, mb in zip(dx_bottom, micro):
        _, pullback = jax.vjp(lambda r, mb=mb: rest_model(r).embed.rows(mb["inputs"]), rest_params)
        grad = jax.tree.map(jnp.add, grad, pullback(dy)[0])
      return grad

    def mean(g):
      return jax.tree.map(lambda x: (x / tokens).astype(x.dtype), g)

    def head_and_rest(grads):
      return {k: grads[k] for k in head_params}, {k: grads[k] for k in rest_params}

    def norms_sweep(dx_top):
      """The layers' summed squared gradient and the cotangent at the bottom; nothing updated."""

      def body(i, carry):
        dx, sq = carry
        grad, dx = layer_grad(layers.get(layer_params, i), layers.get(inputs, i), dx)
        return dx, sq + _sum_squares(mean(grad))

      return layers.sweep(body, (dx_top, jnp.float32(0)))

    def updated(g, s, p, finite):
      """A group's new params and state, or the old ones where the step is to be skipped (not finite): a select
      made as each group is updated, inside the optimizer where it honours ``finite`` (:mod:`galore_jax.optim.guard`).
      """
      finite = finite if skip_nonfinite else None
      u, new_s = guard.update(inner, g, s, p, finite=finite)
      return guard.keep_unless(finite, optax.apply_updates(p, u), p), new_s

    def update_sweep(dx_top, layer_state, finite):
      """Each layer updated as soon as its gradient exists: bottom cotangent, new layer params and state, squared norm.

      The stacked parameters pass an ``optimization_barrier`` with the layer's gradient and the cotangent passed
      down before the update reads layer ``i`` again and writes its new slice: every read of the old slice by
      the backward pass (fused into its matmuls, with no data path to the new values) is then ordered before
      the write, so XLA updates the stacks in place, each matrix's new slice written as it is computed.
      """

      def body(i, carry):
        dx, p_all, s_all, sq, moved = carry
        grad, dx = layer_grad(layers.get(p_all, i), layers.get(inputs, i), dx)
        grad, dx, p_all = jax.lax.optimization_barrier((grad, dx, p_all))
        p, s = layers.get(p_all, i), layers.get(s_all, i)
        g = mean(grad)
        step_finite = finite if skip_nonfinite else None
        u, new_s = guard.update(inner, g, s, p, finite=step_finite)
        u = guard.keep_unless(step_finite, u, jax.tree.map(jnp.zeros_like, u))  # p + 0 is p: a skipped step
        moved = jax.tree.map(jnp.add, moved, overlap(s, new_s))
        return dx, layers.add(p_all, i, u), layers.set(s_all, i, new_s), sq + _sum_squares(g), moved

      return layers.sweep(body, (dx_top, layer_params, layer_state, jnp.float32(0), (jnp.float32(0), jnp.float32(0))))

    def update(group, g, finite):
      p = {"head": head_params, "rest": rest_params}[group]
      new_p, new_s = updated(g, opt_state[group], p, finite)
      return new_p, new_s, overlap(opt_state[group], new_s)

    # 2. head: loss, the head's gradient, the cotangent at the top
    loss, from_head, dx_top = head_pass(jnp.float32(1))
    head_grads, rest_from_head = head_and_rest(from_head)
    head_sq = _sum_squares(mean(head_grads))
    finite = None  # known before the first update only when it is needed: clipping or skipping
    if grad_clip > 0 or skip_nonfinite:
      dx_bottom, layer_sq = norms_sweep(dx_top)
      rest_sq = _sum_squares(mean(rest_grad(dx_bottom, rest_from_head)))
      norm = jnp.sqrt(layer_sq + rest_sq + head_sq)
      finite = jnp.isfinite(loss) & jnp.isfinite(norm)
      # Clipping scales every gradient by one factor and gradients are linear in the cotangent, so the
      # second pass starts from the loss cotangent scaled by it; skipping scales by 0 (the update is
      # discarded anyway). A factor XLA cannot prove to be 1 also keeps the two sweeps apart: merged,
      # they kept every G_l alive until the norm was known.
      factor = clip_factor(norm, grad_clip) if grad_clip > 0 else jnp.float32(1)
      _, from_head, dx_top = head_pass(jnp.where(finite, factor, 0.0) if skip_nonfinite else factor)
      head_grads, rest_from_head = head_and_rest(from_head)

    new_head, new_head_state, head_moved = {}, None, no_overlap(None, None)
    if head_params:  # updated before the sweep starts, so the head's gradient is gone by then
      (new_head, new_head_state, head_moved), dx_top = jax.lax.optimization_barrier(
          (update("head", mean(head_grads), finite), dx_top))
    dx_bottom, new_layers, new_layer_state, layer_sq, layers_moved = update_sweep(dx_top, opt_state["layers"], finite)
    rest_g = mean(rest_grad(dx_bottom, rest_from_head))
    new_rest, new_rest_state, rest_moved = update("rest", rest_g, finite)
    if finite is None:
      norm = jnp.sqrt(layer_sq + _sum_squares(rest_g) + head_sq)
      finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    new_params = {**new_rest, **new_head, "layers": new_layers}
    new_state = {"layers": new_layer_state, "rest": new_rest_state}
    if head_params:
      new_state["head"] = new_head_state
    metrics = {"loss": loss / tokens, "tokens": tokens, "grad_norm": norm, "finite": finite}
    if report_overlap:
      total, count = (sum(parts) for parts in zip(head_moved, layers_moved, rest_moved))
      metrics["subspace_overlap"] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.float32(jnp.nan))
    return new_params, new_state, metrics

  return train
