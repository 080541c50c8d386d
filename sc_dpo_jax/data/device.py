"""Per-host batches -> global ``jax.Array`` s sharded along the mesh's data axes.

    batch = next(data_iterator)                               # this process's rows, numpy
    arrays = global_batch(batch, mesh)                        # jax.Arrays of the global batch

Each process passes its own rows; ``jax.make_array_from_process_local_data`` assembles the global array whose
leading axis is split over the mesh axes ``batch_axes`` (those the mesh has). String fields (prompts, ids)
stay on the host and are left out. Imports no TensorFlow.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Leading axis split over the axes of ``batch_axes`` that ``mesh`` has; the rest replicated."""
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                 batch_axes: Sequence[str] = BATCH_AXES) -> Dict[str, jax.Array]:
  """The numeric fields of this process's ``batch`` as global arrays (strings are skipped)."""
  sharding = batch_sharding(mesh, batch_axes)
  n_shards = 1
  for axis in sharding.spec[0] or ():
    n_shards *= mesh.shape[axis]
  local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "SU":
      continue
    if value.ndim == 0:
      raise ValueError(f"batch field {name!r} is a scalar; every field needs a leading batch axis")
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % n_shards:
      raise ValueError(f"batch field {name!r}: {value.shape[0]} rows per process x {jax.process_count()} "
                       f"processes = {global_rows}, not divisible by the {n_shards} data shards of the mesh "
                       f"{dict(mesh.shape)} ({local_devices} devices on this process)")
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
