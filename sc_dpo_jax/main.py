"""Entry point: ``python -m sc_dpo_jax.main --config=configs/<name>.py[:arg] --workdir=<dir> [--config.key=value]``.

The config's ``job`` field picks what runs (``sc_dpo_jax.jobs.JOBS``); everything else about the run is in
the config, which is written to ``<workdir>/config.json`` before the job starts.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from sc_dpo_jax import jobs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, exports, metrics and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  run = jobs.get(config.get("job", ""))
  from sc_dpo_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize()             # several processes: jax.distributed (cluster or SC_DPO_* env); else nothing
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("job %s, workdir %s", config.job, workdir)
  summary = run(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
