"""Stop cleanly on SIGTERM or SIGINT: finish the step, save, exit.

    with StopSignal() as stop:
      for step in ...:
        state = train_step(...)
        if stop.requested(step):      # all processes agree (a collective when there are several)
          save(...); break

The first signal sets a flag (the step in flight completes); a second SIGINT raises ``KeyboardInterrupt`` as
usual, for a user who really wants out. With several processes, :meth:`StopSignal.requested` gathers the flag
from all of them, so every process stops after the same step (a signal usually reaches one host first).
"""
from __future__ import annotations

import signal
from typing import Optional

import jax
import numpy as np
from absl import logging


class StopSignal:
  """Context manager that turns SIGTERM/SIGINT into a flag (see the module docstring)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), sync_every: int = 1):
    self.signals = signals
    self.sync_every = max(1, int(sync_every))
    self.received: Optional[int] = None
    self._previous = {}

  def _handler(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("received %s: finishing this step, saving a checkpoint and stopping",
                    signal.Signals(signum).name)

  def __enter__(self) -> "StopSignal":
    for sig in self.signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:      # not the main thread: signals cannot be caught here
        logging.warning("not in the main thread: %s will not stop the run cleanly", sig)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()
    return False

  def requested(self, step: int) -> bool:
    """Whether to stop after ``step``: this process got a signal, or (several processes) any of them did."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.asarray(flags).any())
