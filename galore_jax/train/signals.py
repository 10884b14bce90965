"""Ctrl-C (SIGINT) and SIGTERM: one line each, a checkpoint when there is a step to save, a documented exit code.

* During start-up (before the first step) a signal ends the run at once: nothing has been trained, so
  nothing is saved; everything written so far was written whole (atomic renames) or is a temporary.
* During training the first signal stops the run at the next step boundary; the run saves a checkpoint
  of that step and exits. A second signal ends it at once, without that checkpoint (the earlier ones are
  complete: orbax renames a checkpoint into place only when it is whole).

The exit code is 128 + the signal's number, the shell's convention for a process ended by a signal:
130 for SIGINT, 143 for SIGTERM. A run stopped early is not a finished run, even after a clean checkpoint,
so ``train.py && eval.py`` does not go on.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """Installs the handlers of SIGINT and SIGTERM; ``requested`` once a signal asked the training loop to stop."""

  def __init__(self):
    self.signum: int | None = None
    self.training = False
    for signum in STOP_SIGNALS:
      signal.signal(signum, self._handle)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  def start_training(self) -> None:
    """From now on a first signal stops the loop at a step boundary instead of ending the process."""
    self.training = True

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if not self.training:
      _exit(128 + signum, f"stopped by {name} during start-up, before the first step: nothing was saved")
    if self.requested:
      _exit(128 + signum, f"stopped by a second {name}: exiting at once without a checkpoint of this step "
            "(the earlier checkpoints are complete)")
    self.signum = signum
    _say(f"{name}: stopping after this step with a checkpoint ({name} again exits at once)")


def _say(message: str) -> None:
  # os.write, not print: a handler may run while the main thread is inside print, which is not reentrant.
  os.write(2, (message + "\n").encode())


def _exit(code: int, message: str) -> None:
  _say(message)
  os._exit(code)
