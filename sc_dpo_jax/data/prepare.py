"""Prepare a dataset folder from local files with one of the TFDS builders (nothing is downloaded).

    python -m sc_dpo_jax.data.prepare --builder=pickapic --source=/data/pickapic_v2/data --data_dir=/data/tfds
    python -m sc_dpo_jax.data.prepare --builder=pairs_table --source=/data/scp/pairs.jsonl --data_dir=/data/tfds
    python -m sc_dpo_jax.data.prepare --builder=prompts --source=/data/i2p/i2p_benchmark.csv --data_dir=/data/tfds

``--source`` is the folder the builder reads (TFDS's ``manual_dir``) or, for the builders that read one file
(``pairs_table``, ``prompts``, ``pickapic``), that file. ``--config`` names the builder config where a
builder has several (``pairs_table``: ``plain``, ``costs``, ``harmful``, ``costs_harmful``); without it the
config is chosen from the data. The dataset is written to ``DATA_DIR/<builder>/[<config>/]<version>/``, whose
path is printed: give it to ``records.open_source`` (or a config's data path). The builder's counts (rows read,
ties dropped, pairs written, ...) are printed and saved there as ``prepare_stats.json``. An existing dataset
is an error unless ``--overwrite``: re-preparing from another source must not be silently skipped.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional, Sequence

from absl import app, flags, logging

from sc_dpo_jax.data.records import write_json_atomic

STATS_FILE = "prepare_stats.json"


def prepare(builder: str, source: str, data_dir: str, *, config: Optional[str] = None,
            overwrite: bool = False) -> str:
  """Runs builder ``builder`` on ``source`` and returns the prepared dataset folder (what
  ``records.open_source`` reads). See the module docstring for the arguments."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.data import builders  # pylint: disable=g-import-not-at-top
  cls = builders.get_builder(builder)
  source = os.path.abspath(os.path.expanduser(source))
  if os.path.isdir(source):
    manual_dir, file = source, None
  elif os.path.isfile(source):
    if not cls.READS_ONE_FILE:
      raise ValueError(f"{source}: builder {builder!r} reads a folder, not a file")
    manual_dir, file = os.path.dirname(source), os.path.basename(source)
  else:
    raise FileNotFoundError(f"{source}: no such file or folder (--source)")

  names = [c.name for c in cls.BUILDER_CONFIGS]
  if config is None:
    config = cls.detect_config(manual_dir, file)  # also fails early on a missing or ambiguous input
    if config is not None:
      logging.info("%s: config %r chosen from %s", builder, config, source)
  elif not names:
    raise ValueError(f"builder {builder!r} has no configs; drop --config={config}")
  elif config not in names:
    raise ValueError(f"builder {builder!r} has no config {config!r}; choose one of {names}")

  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  instance = cls(data_dir=data_dir, config=config, file=file)
  out = os.fspath(instance.data_path)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out}: already prepared; pass --overwrite (overwrite=True) to prepare it again from "
                          f"{source}")
  modes = tfds.download.GenerateMode
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False,
      download_mode=modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS,
      compute_stats=tfds.download.ComputeStatsMode.SKIP)
  # TFDS would create DATA_DIR/downloads for files it never downloads; keep it out of the user's folder.
  with tempfile.TemporaryDirectory(prefix="sc_dpo_jax_prepare_") as download_dir:
    instance.download_and_prepare(download_dir=download_dir, download_config=download_config)

  split = instance.info.splits["train"]
  stats: Dict[str, Any] = {"builder": builder, "config": config, "version": str(instance.version),
                           "source": source, "num_examples": int(split.num_examples),
                           "num_shards": len(split.shard_lengths)}
  stats.update(instance.stats)
  written = instance.stats.get("pairs_written", instance.stats.get("prompts_written"))
  if written is not None and written != stats["num_examples"]:
    raise RuntimeError(f"{out}: the builder yielded {written} records but TFDS wrote {stats['num_examples']}")
  write_json_atomic(os.path.join(out, STATS_FILE), stats)
  logging.info("prepared %s: %s", out, json.dumps(stats, sort_keys=True))
  return out


# -- command line ----------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags, defined only when run as a program: ``sc_dpo_jax.main`` has its own ``--config``, so
  defining ours at import would make importing both modules a duplicate-flag error."""
  flags.DEFINE_string("builder", None, "One of sc_dpo_jax.data.builders.BUILDERS.", flag_values=flag_values)
  flags.DEFINE_string("source", None, "The folder (or, for one-file builders, the file) to read.",
                      flag_values=flag_values)
  flags.DEFINE_string("data_dir", None, "Where the dataset is written (DATA_DIR/<builder>/[<config>/]<version>).",
                      flag_values=flag_values)
  flags.DEFINE_string("config", None, "Builder config; default: chosen from the data.", flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace an already prepared dataset.", flag_values=flag_values)
  flags.mark_flags_as_required(["builder", "source", "data_dir"], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  out = prepare(flag_values.builder, flag_values.source, flag_values.data_dir, config=flag_values.config,
                overwrite=flag_values.overwrite)
  with open(os.path.join(out, STATS_FILE)) as f:
    print(f.read().rstrip())
  print(out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
