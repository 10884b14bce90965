"""Divergence: non-finite steps are counted, reported and never checkpointed; a collapsed model is warned about.

A step is *non-finite* when its loss or its gradient norm is NaN or infinite (the ``finite`` metric of
:func:`~galore_jax.train.steps.make_steps`). The config chooses what follows (``train.nonfinite``):

* ``"skip"`` (the default): the step changes nothing (``make_steps(skip_nonfinite=True)``: weights, moments,
  GaLore bases and step count keep their values; its batch is consumed) and the run goes on, until
  ``train.max_nonfinite_steps`` non-finite steps in a row stop it: a model that stays non-finite does not recover.
* ``"stop"``: the first non-finite step stops the run (the step is not guarded, so it costs nothing).

No checkpoint is written while the latest step is non-finite, so the last checkpoint of a run that
stops is the last good one. Each non-finite step gets its own line in ``metrics.jsonl``, with ``NaN`` or
``Infinity`` as they are.

The flag is read one step late, after the next step has been queued, so that checking costs the device
no idle time; before a save or a log line the current step is checked at once.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

POLICIES = ("skip", "stop")


class Diverged(RuntimeError):
  """The run stops: too many non-finite steps in a row, or a state that is not finite at a save."""


class NonFiniteGuard:
  """Counts non-finite steps and raises :class:`Diverged` at the policy's limit.

  ``report(step, loss, grad_norm)`` is called once for every non-finite step, before any raise.
  """

  def __init__(self, policy: str, max_in_a_row: int, report: Callable[[int, float, float], None]):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.limit = max_in_a_row if policy == "skip" else 1
    self.total = self.in_a_row = 0
    self._first_bad_step = None
    self._pending = None
    self._report = report

  def push(self, step: int, metrics: dict[str, Any]) -> None:
    """Check the step held so far (the device has finished it by now) and hold ``step``'s metrics instead."""
    self.settle()
    self._pending = (step, metrics)

  def settle(self) -> bool:
    """Check the held step now; True when the latest step was finite (its state may be saved)."""
    if self._pending is not None:
      (step, metrics), self._pending = self._pending, None
      if bool(jax.device_get(metrics["finite"])):
        self.in_a_row = 0
      else:
        self._count(step, metrics)
    return self.in_a_row == 0

  def _count(self, step: int, metrics: dict[str, Any]) -> None:
    loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    self.total += 1
    self.in_a_row += 1
    if self.in_a_row == 1:
      self._first_bad_step = step
    self._report(step, loss, grad_norm)
    if self.in_a_row >= self.limit:
      steps = f"step {step}" if self.in_a_row == 1 else f"steps {self._first_bad_step}-{step}"
      rule = ("train.nonfinite='stop'" if self.policy == "stop"
              else f"{self.in_a_row} in a row, train.max_nonfinite_steps={self.limit}")
      raise Diverged(f"training diverged: loss {loss} and grad_norm {grad_norm} at {steps} are not finite ({rule})")


class CollapseWatch:
  """Warns once when the gradient is exactly zero with a positive loss at ``patience`` logged steps in a row.

  A too-large learning rate can leave a model that predicts the same distribution for every input
  (typically uniform: loss ``ln(vocab_size)``) with every gradient exactly 0: it never trains again, and
  nothing is non-finite. An exactly zero gradient norm with a positive loss has no benign cause (a batch
  with no target has loss 0), so two logged steps of it are a collapse.
  """

  def __init__(self, vocab_size: int, patience: int = 2):
    self.vocab_size, self.patience = vocab_size, patience
    self._in_a_row = 0
    self.warned = False

  def observe(self, step: int, loss: float, grad_norm: float) -> str | None:
    """The warning (once per run), or None."""
    self._in_a_row = self._in_a_row + 1 if grad_norm == 0.0 and loss > 0.0 else 0
    if self.warned or self._in_a_row < self.patience:
      return None
    self.warned = True
    uniform = math.log(self.vocab_size)
    what = (f"loss {loss:.4f} = ln(vocab_size {self.vocab_size}): uniform predictions"
            if abs(loss - uniform) < 1e-3 * uniform else f"loss {loss:.4f}")
    return (f"step {step}: the gradient is exactly 0 at {self.patience} logged steps in a row ({what}): the model "
            "has collapsed and will not train further; a lower train.lr may help")
