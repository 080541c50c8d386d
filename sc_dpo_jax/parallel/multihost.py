"""Host-side collectives of a multi-process job (each a no-op, or the identity, with one process).

    barrier("synthetic data")                   # what process 0 wrote exists before the others read it
    rows = local_rows(images)                   # this process's rows of a global batch-sharded array
    prompts, arrays = gather(prompts, {"reward": r})    # every process's prompts and rows, in process order

Every process of the job must call each of them at the same point (they are collectives).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import jax
import numpy as np


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one), so what process 0 wrote exists before the others read it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def local_rows(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a global array sharded on its leading (batch) dimension: the inverse of
  ``data.device.global_batch``."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, x.sharding.spec))


def gather(strings: Sequence[str], arrays: Dict[str, np.ndarray]) -> Tuple[List[str], Dict[str, np.ndarray]]:
  """``strings`` and the per-row ``arrays`` of all processes, concatenated in process order; every process
  gets all of them (the RL trainer keeps its per-prompt reward buffers identical on every process this way).
  Strings travel as zero-padded UTF-8 rows of the longest one's width."""
  if jax.process_count() == 1:
    return list(strings), dict(arrays)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = [s.encode("utf-8") for s in strings]
  lengths = np.array([len(e) for e in encoded], np.int32)
  width = int(np.max(multihost_utils.process_allgather(np.array([max(lengths.max(), 1)], np.int32))))
  buffer = np.zeros((len(encoded), width), np.uint8)
  for i, e in enumerate(encoded):
    buffer[i, :len(e)] = np.frombuffer(e, np.uint8)
  all_buffer = np.asarray(multihost_utils.process_allgather(buffer, tiled=True))
  all_lengths = np.asarray(multihost_utils.process_allgather(lengths, tiled=True))
  all_strings = [bytes(row[:n]).decode("utf-8") for row, n in zip(all_buffer, all_lengths)]
  return all_strings, {k: np.asarray(multihost_utils.process_allgather(np.asarray(v), tiled=True))
                       for k, v in arrays.items()}
