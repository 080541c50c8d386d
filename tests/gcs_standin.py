"""A local stand-in for Google Cloud Storage, served to ``etils.epath`` through fsspec: ``gs://bucket/x`` is the
folder ``<root>/bucket/x``.

    from tests.gcs_standin import gcs_standin

    def test_export_to_a_bucket(tmp_path):
      with gcs_standin(tmp_path) as root:
        models.save_pipeline("gs://bucket/run/export", pipe)       # lands in root / "bucket/run/export"
        assert (root / "bucket/run/export/model_index.json").exists()

or as a fixture: ``def test_x(gcs_root): ...`` after ``from tests.gcs_standin import gcs_root  # noqa: F401``.

How epath reaches it (etils 1.15, ``etils/epath/gpath.py`` and ``backend.py``): a ``gs://`` path goes to the
``tf_backend`` (``tf.io.gfile``) when TensorFlow is installed, else to the fsspec backend, which asks
``fsspec.filesystem("gcs")``. The stand-in therefore sets ``EPATH_USE_TF=false`` (epath's own switch) and registers,
for the protocols ``gs`` and ``gcs``, an ``fsspec.implementations.dirfs.DirFileSystem`` over the local filesystem
rooted at ``<tmp_path>/gcs``. epath caches both decisions (``_is_tf_installed`` and the fsspec backend's filesystem),
so those caches are cleared on entry and on exit; the previous fsspec registrations and environment are restored
on exit. Nothing of the project's code is replaced: the real epath and fsspec code paths run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
from typing import Iterator

import fsspec
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")


def _clear_epath_caches() -> None:
  for cached in (getattr(epath_gpath, "_is_tf_installed", None),
                 getattr(getattr(epath_backend, "_FileSystemSpecBackend", None), "_get_filesystem", None)):
    if cached is not None and hasattr(cached, "cache_clear"):
      cached.cache_clear()


def _standin_class(root: str) -> type:
  class LocalGCS(DirFileSystem):
    """``gs://bucket/key`` -> ``root/bucket/key`` on the local disk."""
    protocol = PROTOCOLS
    cachable = False

    def __init__(self, *args, **storage_options):  # epath passes gcsfs options (finalize_on_close): ignored
      del args, storage_options
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

  return LocalGCS


@contextlib.contextmanager
def gcs_standin(tmp_path) -> Iterator[pathlib.Path]:
  """Serves ``gs://`` from ``tmp_path/gcs`` for the duration of the block; yields that local root."""
  root = pathlib.Path(tmp_path) / "gcs"
  root.mkdir(parents=True, exist_ok=True)
  # fsspec has no public way to unregister; its module keeps the writable dict behind fsspec.registry.
  registry = importlib.import_module("fsspec.registry")._registry  # pylint: disable=protected-access
  previous = {p: registry.get(p) for p in PROTOCOLS}
  previous_env = os.environ.get("EPATH_USE_TF")
  cls = _standin_class(str(root))
  try:
    os.environ["EPATH_USE_TF"] = "false"
    for p in PROTOCOLS:
      fsspec.register_implementation(p, cls, clobber=True)
    _clear_epath_caches()
    yield root
  finally:
    for p, cls_before in previous.items():
      if cls_before is None:
        registry.pop(p, None)
      else:
        fsspec.register_implementation(p, cls_before, clobber=True)
    if previous_env is None:
      os.environ.pop("EPATH_USE_TF", None)
    else:
      os.environ["EPATH_USE_TF"] = previous_env
    _clear_epath_caches()


@pytest.fixture
def gcs_root(tmp_path) -> Iterator[pathlib.Path]:
  """pytest fixture form of :func:`gcs_standin`: ``gs://`` is served from the yielded local folder."""
  with gcs_standin(tmp_path) as root:
    yield root
