"""Entry point: ``python -m sc_dpo_jax.main --config=configs/<name>.py[:arg] --workdir=<dir> [--config.key=value]``.

The config's ``job`` field picks what runs (``sc_dpo_jax.jobs.JOBS``); everything else about the run is in
the config, which is written to ``<workdir>/config.json`` before the job starts. The workdir may be relative
(made absolute once, here), absolute, or a bucket URI (``gs://bucket/run``: every file goes through
``etils.epath``).

Exit status: 0 when the run finished; ``128 + signal`` (143 for SIGTERM, 130 for SIGINT) when a signal stopped
it after saving a checkpoint, so a scheduler can requeue it (rerunning the same command resumes); 1 with a
one-paragraph message, no traceback, when the NaN guard stopped it or the workdir's checkpoint belongs to
another run.
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sc_dpo_jax import jobs, paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, exports, metrics and summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def _drop_closed_event_loop_noise(previous):
  """``sys.unraisablehook`` that drops ``RuntimeError('Event loop is closed')`` raised while garbage collection
  finalises the asyncio futures of an Orbax restore that failed (a damaged checkpoint, which the trainer has
  already set aside and reported in one warning); every other unraisable exception goes to ``previous``."""

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      logging.debug("dropped an 'Event loop is closed' left by a failed checkpoint read")
      return
    previous(unraisable)

  return hook


def main(argv):
  sys.unraisablehook = _drop_closed_event_loop_noise(sys.unraisablehook)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, paths.resolve(_WORKDIR.value)
  run = jobs.get(config.get("job", ""))
  from sc_dpo_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize()             # several processes: jax.distributed (cluster or SC_DPO_* env); else nothing
  import jax  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.train import checkpoint, guard, harness  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    paths.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
  logging.info("job %s, workdir %s", config.job, workdir)
  try:
    summary = run(config, str(workdir))
  except (guard.NonFiniteError, checkpoint.IncompatibleCheckpoint) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  status = harness.exit_status(summary)
  if status:
    logging.warning("stopped by %s: exiting with status %d (rerun the same command to resume)",
                    summary.get("stop_signal") or "a signal", status)
    sys.exit(status)


if __name__ == "__main__":
  app.run(main)
