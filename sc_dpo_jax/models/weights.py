"""Weight files of PyTorch-format model folders, and the renaming between PyTorch and Flax trees.

Reading and writing use safetensors' numpy API (no torch at run time); a pickled ``.bin`` is read only when the
caller opts in with ``allow_pickle=True`` (it needs torch, and unpickling runs code from the file).

Naming: a Flax path ``("down_blocks_0", "resnets_1", "conv1", "kernel")`` is the PyTorch key
``down_blocks.0.resnets.1.conv1.weight``. A path segment ``<container>_<i>`` is a PyTorch ``ModuleList`` entry
when ``<container>`` is one of the model's list names; the leaf ``kernel``/``scale``/``embedding`` is
PyTorch's ``weight``. Conv kernels are transposed OIHW <-> HWIO and linear kernels (out, in) <-> (in, out).
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util
from flax.core import meta

from sc_dpo_jax.models import storage

Path = Tuple[str, ...]
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointMismatchError(ValueError):
  """A weight file does not fit the model: lists missing, unexpected and mis-shaped tensors."""


class PickleRefusedError(ValueError):
  """The folder holds only a pickled ``.bin`` checkpoint and the caller did not pass allow_pickle=True."""


def _add_variant(name: str, variant: Optional[str]) -> str:
  if not variant:
    return name
  parts = name.split(".")
  return ".".join(parts[:-1] + [variant, parts[-1]])


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(folder: str, weights_name: str, *, allow_pickle: bool = False,
                    variant: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads every tensor of ``folder/<weights_name>.safetensors`` (or its sharded index).

  Args:
    folder: the model folder (local, or a ``gs://`` URI: see ``models.storage``).
    weights_name: file stem, e.g. ``diffusion_pytorch_model`` or ``model``.
    allow_pickle: also accept ``<weights_name>.bin`` (needs torch; unpickling can run code).
    variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.

  Returns:
    (name -> numpy array, description of the file(s) read, for error messages).
  """
  single = storage.join(folder, _add_variant(f"{weights_name}.safetensors", variant))
  index = storage.join(folder, _add_variant(f"{weights_name}.safetensors.index.json", variant))
  if storage.is_file(single):
    return storage.read_safetensors(single), single
  if storage.is_file(index):
    return _read_sharded(index, storage.read_safetensors), index
  pickled = storage.join(folder, _add_variant(f"{weights_name}.bin", variant))
  pickled_index = storage.join(folder, _add_variant(f"{weights_name}.bin.index.json", variant))
  if storage.is_file(pickled) or storage.is_file(pickled_index):
    found = pickled if storage.is_file(pickled) else pickled_index
    if not allow_pickle:
      raise PickleRefusedError(
          f"{found} is a pickled PyTorch checkpoint; loading it can run arbitrary code. Convert it to "
          f"safetensors, or pass allow_pickle=True if you trust the file (needs torch installed).")
    if found == pickled:
      return _read_pickle(pickled), pickled
    return _read_sharded(pickled_index, _read_pickle), pickled_index
  present = storage.listdir(folder) if storage.is_dir(folder) else "(folder does not exist)"
  raise FileNotFoundError(f"no weights in {folder}: looked for {os.path.basename(single)} and "
                          f"{os.path.basename(index)}; the folder holds {present}")


def _read_sharded(index_path: str, read_one) -> Dict[str, np.ndarray]:
  try:
    weight_map = storage.read_json(index_path)["weight_map"]
  except (ValueError, KeyError) as e:
    raise ValueError(f"{index_path}: not a valid index file (needs a 'weight_map'): {e}") from e
  folder = storage.dirname(index_path)
  tensors: Dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    path = storage.join(folder, shard)
    if not storage.is_file(path):
      raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing from {folder}")
    for name, value in read_one(path).items():
      if weight_map.get(name) != shard:
        raise CheckpointMismatchError(f"{path} holds {name!r}, which {index_path} assigns to "
                                      f"{weight_map.get(name)!r}")
      tensors[name] = value
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise CheckpointMismatchError(f"{index_path} lists tensors no shard holds: {missing[:20]}")
  return tensors


def _read_pickle(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading the pickled checkpoint {path} needs torch installed") from e
  source = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
  state = torch.load(source, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- naming
def flax_path_to_torch(path: Path, containers: Iterable[str]) -> str:
  """``("down_blocks_0", "attentions_1", "proj_in", "kernel")`` -> ``down_blocks.0.attentions.1.proj_in.weight``."""
  containers = frozenset(containers)
  parts = []
  for segment in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", segment)
    if m and m.group(1) in containers:
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(segment)
  leaf = path[-1]
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return ".".join(parts)


def _to_flax_layout(path: Path, tensor: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and tensor.ndim == 4:
    return np.transpose(tensor, (2, 3, 1, 0))   # OIHW -> HWIO
  if path[-1] == "kernel" and tensor.ndim == 2:
    return np.transpose(tensor)                  # (out, in) -> (in, out)
  return tensor


def _to_torch_layout(path: Path, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  if path[-1] == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(np.transpose(array))
  return np.ascontiguousarray(array)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], expected: Mapping[Path, Tuple[int, ...]],
                  containers: Iterable[str], *, source: str, dtype=None) -> Dict:
  """Renames and transposes ``state_dict`` into the nested Flax tree whose leaf shapes are ``expected``.

  Every expected leaf must be filled and every tensor used, with matching shapes; otherwise raises
  :class:`CheckpointMismatchError` listing the missing, unexpected and mis-shaped names (``source`` is
  quoted to say which file).
  """
  by_torch_name = {flax_path_to_torch(p, containers): p for p in expected}
  flat, unexpected, misshaped, misshaped_names = {}, [], [], set()
  for name, tensor in state_dict.items():
    path = by_torch_name.get(name)
    if path is None:
      unexpected.append(name)
      continue
    array = _to_flax_layout(path, np.asarray(tensor))
    if tuple(array.shape) != tuple(expected[path]):
      misshaped.append(f"{name}: file has {tuple(np.shape(tensor))} (as Flax {tuple(array.shape)}), "
                       f"model expects Flax {tuple(expected[path])}")
      misshaped_names.add(name)
      continue
    flat[path] = array if dtype is None else array.astype(dtype)
  missing = sorted(n for n, p in by_torch_name.items() if p not in flat and n not in misshaped_names)
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the model:"]
    for title, names in (("missing", missing), ("unexpected", sorted(unexpected)),
                         ("mis-shaped", misshaped)):
      if names:
        shown = "\n    ".join(names[:25]) + (f"\n    ... and {len(names) - 25} more"
                                              if len(names) > 25 else "")
        lines.append(f"  {len(names)} {title}:\n    {shown}")
    raise CheckpointMismatchError("\n".join(lines))
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping, containers: Iterable[str], dtype=None) -> Dict[str, np.ndarray]:
  """The PyTorch state dict (names and layouts) of a Flax parameter tree, as numpy arrays."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    array = np.asarray(value)
    out[flax_path_to_torch(path, containers)] = _to_torch_layout(
        path, array if dtype is None else array.astype(dtype))
  return out


# ---------------------------------------------------------------------------------------------- writing
def write_state_dict(folder: str, weights_name: str, tensors: Mapping[str, np.ndarray], *,
                     max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``folder/<weights_name>.safetensors``, or shards and an index if larger than ``max_shard_bytes``
  (``folder`` local or a ``gs://`` URI: see ``models.storage``)."""
  storage.makedirs(folder)
  ours = re.compile(re.escape(weights_name) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
  for old in storage.listdir(folder):  # a stale single file or shard set would shadow or mix with the new one
    if ours.fullmatch(old):
      storage.remove(storage.join(folder, old))
  metadata = {"format": "pt"}
  total = sum(t.nbytes for t in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    storage.write_safetensors(storage.join(folder, f"{weights_name}.safetensors"), tensors, metadata=metadata)
    return
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    storage.write_safetensors(storage.join(folder, fname), shard, metadata=metadata)
    weight_map.update({name: fname for name in shard})
  storage.write_json(storage.join(folder, f"{weights_name}.safetensors.index.json"),
                     {"metadata": {"total_size": total}, "weight_map": weight_map}, sort_keys=True)


# ---------------------------------------------------------------------------------------------- configs
# The key each library stamps its version under in a config.json, and what we write when it is not installed.
_VERSION_KEYS = {"diffusers": ("_diffusers_version", "0.31.0"), "transformers": ("transformers_version", "4.46.0")}


def library_version(library: str) -> str:
  """The installed version of ``library`` ("diffusers" or "transformers"), or the oldest we support."""
  try:
    return importlib.metadata.version(library)
  except importlib.metadata.PackageNotFoundError:
    return _VERSION_KEYS[library][1]


def save_model_folder(folder: str, params: Mapping, config: Mapping, *, weights_name: str,
                      containers: Iterable[str], library: str, dtype=None,
                      max_shard_bytes: Optional[int] = None) -> None:
  """Writes a PyTorch-library model folder: ``<weights_name>.safetensors`` (sharded above ``max_shard_bytes``,
  converted to ``dtype`` if given) from the Flax ``params`` and ``config.json`` from ``config``."""
  params = meta.unbox(params)
  tensors = flax_to_torch(params, containers, dtype=None if dtype is None else np.dtype(dtype))
  write_state_dict(folder, weights_name, tensors, max_shard_bytes=max_shard_bytes)
  write_config(folder, config, library)


def write_config(folder: str, config: Mapping, library: str) -> None:
  """Writes ``folder/config.json`` stamped with ``library``'s version, as that library's ``save_pretrained``."""
  config = dict(config)
  config[_VERSION_KEYS[library][0]] = library_version(library)
  storage.write_json(storage.join(folder, "config.json"), config)

