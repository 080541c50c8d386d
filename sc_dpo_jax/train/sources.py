"""Where a trainer's records come from: ``config.data.train``, or for a tiny run (``model.tiny``) a synthetic
set written once into ``<workdir>/data/<name>`` by process 0, or an error saying what to set.

    source = open_train_source(config, workdir, kind=schema.PAIR, name="synthetic_pairs",
                               write_synthetic=lambda folder: synthetic.write_synthetic_pairs(folder, ...),
                               what="a pair dataset folder (python -m sc_dpo_jax.data.prepare makes one)",
                               trainer="the DPO trainer needs pairs")
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections

from sc_dpo_jax import paths
from sc_dpo_jax.data import records
from sc_dpo_jax.parallel import multihost


def open_train_source(config: ml_collections.ConfigDict, workdir: paths.PathLike, *, kind: str, name: str,
                      write_synthetic: Callable[[str], object], what: str, trainer: str) -> records.Source:
  """The training records (see the module docstring); a dataset of another ``kind`` is refused."""
  d = config.data
  if d.train:
    source = records.open_source(d.train, split=d.split)
  elif config.model.tiny:
    if paths.is_uri(workdir):
      raise ValueError(f"config.data.train is empty, so this tiny run would write {name.replace('_', ' ')} into "
                       f"{workdir}/data, but the record writer writes local folders only: set "
                       f"--config.data.train to a dataset folder, or use a local workdir")
    folder = str(paths.resolve(workdir) / "data" / name)
    if jax.process_index() == 0:
      write_synthetic(folder)
    multihost.barrier(name)
    source = records.open_source(folder)
  else:
    raise ValueError(f"config.data.train is empty: set --config.data.train to {what}")
  if source.spec.kind != kind:
    raise ValueError(f"{d.train or source.name}: a {source.spec.kind} dataset; {trainer}")
  return source
