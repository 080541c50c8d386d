"""The device mesh: one ``jax.sharding.Mesh`` with the axes ("data", "fsdp", "tensor"), in that order.

    mesh = make_mesh({"data": -1, "fsdp": 8, "tensor": 1})     # e.g. 64 devices -> (8, 8, 1)

What each axis means (``parallel.rules`` maps parameter dims onto them, ``data.device`` the batch):

============ =======================================================================================
``data``     pure data parallelism: the batch is split, parameters are replicated along it
``fsdp``     the batch is split too, and so are the parameters and optimiser state (ZeRO-3 / FSDP):
             each device stores 1/fsdp of every large tensor; XLA all-gathers weights where used
``tensor``   model (Megatron-style) parallelism: attention heads and MLP widths are split
============ =======================================================================================

The order puts ``tensor`` innermost, so with ``mesh_utils.create_device_mesh`` its devices are the closest
ones (same host / ICI neighbours), where the per-layer collectives of tensor parallelism are cheapest, and
``data`` outermost, where the one gradient all-reduce per step can afford slower links.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
DEFAULT_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def resolve_shape(shape: Optional[Mapping[str, int]], device_count: int) -> tuple:
  """The ``(data, fsdp, tensor)`` sizes of ``shape`` for ``device_count`` devices.

  ``shape`` maps axis names to sizes (a dict or an ml_collections ``ConfigDict``); at most one size may be -1,
  meaning "all the devices the others leave". A missing ``fsdp`` or ``tensor`` is 1; a missing ``data`` is -1
  unless another axis is -1 (then 1), so ``{"fsdp": 4}`` on 8 devices is (2, 4, 1). Raises ``ValueError``
  naming the axes and the device count when the sizes do not multiply to ``device_count``, and ``KeyError``
  for an unknown axis name.
  """
  if shape is None:
    shape = DEFAULT_SHAPE
  items = dict(shape.items()) if hasattr(shape, "items") else None
  if items is None:
    raise TypeError(f"mesh shape must be a mapping of axis name -> size over {AXES}, got {type(shape).__name__}")
  unknown = sorted(set(items) - set(AXES))
  if unknown:
    raise KeyError(f"unknown mesh axis name(s) {unknown} in mesh shape {items}; the axes are {list(AXES)}")
  sizes = {}
  data_default = 1 if any(items.get(a) == -1 for a in AXES) else -1
  for axis in AXES:
    value = items.get(axis, data_default if axis == "data" else 1)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
      raise ValueError(f"mesh axis {axis!r} = {value!r} must be a positive int or -1 (the remaining devices)")
    sizes[axis] = int(value)
  wild = [a for a in AXES if sizes[a] == -1]
  if len(wild) > 1:
    raise ValueError(f"mesh shape {sizes} has -1 for {wild}; at most one axis may be -1 (the remaining devices)")
  known = math.prod(v for v in sizes.values() if v != -1)
  if wild:
    if device_count % known:
      raise ValueError(f"mesh shape {sizes}: the fixed axes {_fixed(sizes)} use {known} devices, which does not "
                       f"divide the {device_count} devices; {wild[0]!r} = -1 cannot fill the rest")
    sizes[wild[0]] = device_count // known
  elif known != device_count:
    raise ValueError(f"mesh shape {sizes} has {known} devices (data x fsdp x tensor) but there are "
                     f"{device_count} devices; make the product equal or set one axis to -1")
  return tuple(sizes[a] for a in AXES)


def _fixed(sizes):
  return {a: v for a, v in sizes.items() if v != -1}


def make_mesh(shape: Optional[Mapping[str, int]] = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``Mesh`` over ``devices`` (default: all of ``jax.devices()``, every process's) with axes
  ("data", "fsdp", "tensor") sized by ``shape`` (see :func:`resolve_shape`; default ``{"data": -1}``).

  The device order comes from ``mesh_utils.create_device_mesh``, which knows the physical topology of TPUs
  and GPUs (so ``tensor`` groups are neighbours); where it cannot place the shape (some CPU or odd device
  counts) the devices are reshaped in their listed order, which on multi-process runs keeps each process's
  devices contiguous.
  """
  devices = list(jax.devices() if devices is None else devices)
  dims = resolve_shape(shape, len(devices))
  try:
    array = mesh_utils.create_device_mesh(dims, devices)
  except (ValueError, NotImplementedError, AssertionError) as e:   # topologies it does not model
    logging.info("mesh_utils.create_device_mesh cannot place %s (%s); reshaping the device list", dims, e)
    array = np.asarray(devices, dtype=object).reshape(dims)
  return Mesh(array, AXES)


def describe(mesh: Mesh) -> str:
  """One line for logs, e.g. ``mesh data=2 fsdp=4 tensor=1 (8 devices, cpu, 1 process)``."""
  sizes = " ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
  first = mesh.devices.flat[0]
  processes = len({d.process_index for d in mesh.devices.flat})
  return (f"mesh {sizes} ({mesh.devices.size} devices, {first.platform}, {processes} process"
          f"{'es' if processes > 1 else ''})")
