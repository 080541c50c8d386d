"""Files of model folders through ``etils.epath``: local paths (relative or absolute) and ``gs://`` (also ``s3://``,
``az://``) URIs, so an export can land in a cloud workdir and a model can be loaded from one.

    storage.write_json(storage.join("gs://bucket/run/export", "model_index.json"), index)
    state = storage.read_safetensors("gs://bucket/run/export/unet/diffusion_pytorch_model.safetensors")

Local files keep the fast paths (safetensors' ``load_file``/``save_file``, no copy through memory); remote files
are read and written whole as bytes. Libraries that only take a local folder (transformers' tokenizers) work on a
temporary local copy: :func:`local_copy` to read, :func:`staged` to write.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Union

import numpy as np
import safetensors.numpy
from etils import epath

from sc_dpo_jax import paths

PathLike = Union[str, os.PathLike]


is_remote = paths.is_uri        # whether a path is a URI (gs://...) rather than a local path


def join(folder: PathLike, *names: str) -> str:
  """``folder/name/...`` as a string; keeps a ``gs://`` prefix and a relative local path as they are."""
  if not is_remote(folder):
    return os.path.join(os.fspath(folder), *names)
  return os.fspath(epath.Path(folder).joinpath(*names))


def dirname(path: PathLike) -> str:
  """The folder holding ``path`` (``gs://b/x`` for ``gs://b/x/f``)."""
  if not is_remote(path):
    return os.path.dirname(os.fspath(path))
  return os.fspath(epath.Path(path).parent)


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def is_file(path: PathLike) -> bool:
  return epath.Path(path).is_file()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(folder: PathLike) -> List[str]:
  """The sorted names in ``folder``; empty when it does not exist (an object store has no empty folders)."""
  p = epath.Path(folder)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


def makedirs(folder: PathLike) -> None:
  epath.Path(folder).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
  epath.Path(path).unlink(missing_ok=True)


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


# One implementation of each, in sc_dpo_jax.paths (parents created; errors name the file).
write_bytes = paths.write_bytes
read_json = paths.read_json
write_json = paths.write_json


def read_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
  """Every tensor of a ``.safetensors`` file as numpy arrays."""
  if not is_remote(path):
    return dict(safetensors.numpy.load_file(os.fspath(path)))
  return dict(safetensors.numpy.load(read_bytes(path)))


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Dict[str, str]] = None) -> None:
  """Writes ``tensors`` to a ``.safetensors`` file."""
  if not is_remote(path):
    safetensors.numpy.save_file(dict(tensors), os.fspath(path), metadata=metadata)
    return
  write_bytes(path, safetensors.numpy.save(dict(tensors), metadata=metadata))


@contextlib.contextmanager
def local_copy(folder: PathLike) -> Iterator[str]:
  """A local folder with the files of ``folder`` (not its subfolders): ``folder`` itself when it is local, else a
  temporary copy, removed on exit."""
  if not is_remote(folder):
    yield os.fspath(folder)
    return
  with tempfile.TemporaryDirectory(prefix="sc_dpo_jax_") as tmp:
    for name in listdir(folder):
      source = epath.Path(folder) / name
      if not source.is_dir():
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(source.read_bytes())
    yield tmp


@contextlib.contextmanager
def staged(folder: PathLike) -> Iterator[str]:
  """A local folder to write into for ``folder``: ``folder`` itself (created) when it is local, else a temporary
  folder whose files are copied to ``folder`` on a clean exit."""
  if not is_remote(folder):
    makedirs(folder)
    yield os.fspath(folder)
    return
  tmp = tempfile.mkdtemp(prefix="sc_dpo_jax_")
  try:
    yield tmp
    makedirs(folder)
    for name in sorted(os.listdir(tmp)):
      local = os.path.join(tmp, name)
      if os.path.isfile(local):
        with open(local, "rb") as f:
          write_bytes(join(folder, name), f.read())
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
