"""Paths of a run: local (relative or absolute) or a bucket URI (``gs://``, ``s3://``), through ``etils.epath``.

    workdir = paths.resolve("workdir/x")        # PosixGPath('/abs/workdir/x'); gs://bucket/run stays as it is
    paths.write_json(workdir / "config.json", config_dict)
    paths.write_text(workdir / "report.md", text)

Every file the trainers write or read in a workdir goes through :mod:`etils.epath` (the path library Orbax
itself uses), so ``--workdir=gs://bucket/run`` keeps config, metrics, samples, summary, checkpoints and export
in the bucket. Local paths are made absolute once, at start: Orbax refuses relative checkpoint paths, and a run
that changes its current directory still writes where it began.
"""
from __future__ import annotations

import json
import os
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_uri(path: PathLike) -> bool:
  """Whether ``path`` names a remote store (``scheme://...``) rather than a local file."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """``path`` as an :class:`epath.Path`: local paths absolute (``~`` expanded), URIs unchanged."""
  text = os.fspath(path)
  if not text:
    raise ValueError("empty path: give a directory (relative or absolute) or a gs:// URI")
  if is_uri(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_text(path: PathLike, text: str) -> epath.Path:
  """Writes ``text`` to ``path`` (parents created) and returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes ``data`` to ``path`` (parents created) and returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def write_json(path: PathLike, obj: Any, indent: int = 2, *, sort_keys: bool = False) -> epath.Path:
  """Writes ``obj`` as JSON to ``path`` (parents created) and returns the path."""
  return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: PathLike) -> Any:
  """The JSON value in ``path``; ``FileNotFoundError`` or ``ValueError`` naming the file when it is missing or
  not valid JSON."""
  p = epath.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{os.fspath(path)} does not exist")
  try:
    return json.loads(p.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from e
