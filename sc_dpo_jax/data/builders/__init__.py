"""TFDS builders that turn local copies of the public formats into record folders (nothing is downloaded).

=============== ======================================================= ===============================
name            input (``--source``)                                    records
=============== ======================================================= ===============================
``pickapic``    Pick-a-Pic v2 parquet shards                            pairs, chosen first, ties dropped
``pairs_table`` a JSONL/CSV of (prompt, chosen, rejected[, costs,       pairs; config ``plain``, ``costs``,
                harmful, id]) with its images                           ``harmful`` or ``costs_harmful``
``duo_folder``  ``safe/`` + ``unsafe/`` images and ``prompts.json``     pairs, chosen = safe
``prompts``     an I2P-style CSV or a ``.txt`` list                     prompts
=============== ======================================================= ===============================

Prepare one with ``python -m sc_dpo_jax.data.prepare`` (or :func:`sc_dpo_jax.data.prepare.prepare`) and read
the result with ``records.open_source``. :data:`BUILDERS` is this package's registry; the classes are not in
TFDS's global registry (see ``_base``), so ``tfds.builder("pickapic")`` does not know them.
"""
from __future__ import annotations

from typing import Dict, Type

from sc_dpo_jax.data.builders._base import LocalBuilder, SourceError
from sc_dpo_jax.data.builders.duo_folder import DuoFolder
from sc_dpo_jax.data.builders.pairs_table import PairsTable
from sc_dpo_jax.data.builders.pickapic import Pickapic
from sc_dpo_jax.data.builders.prompts import Prompts

BUILDERS: Dict[str, Type[LocalBuilder]] = {
    "pickapic": Pickapic,
    "pairs_table": PairsTable,
    "duo_folder": DuoFolder,
    "prompts": Prompts,
}


def get_builder(name: str) -> Type[LocalBuilder]:
  """The builder class called ``name``; an unknown name is an error listing the known ones."""
  if name not in BUILDERS:
    raise ValueError(f"unknown builder {name!r}; choose one of {sorted(BUILDERS)}")
  return BUILDERS[name]


__all__ = ["BUILDERS", "DuoFolder", "LocalBuilder", "PairsTable", "Pickapic", "Prompts", "SourceError", "get_builder"]
