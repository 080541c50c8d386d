"""Workdir paths: relative made absolute, ``gs://`` through etils.epath (served by a local stand-in, see
``tests/gcs_standin.py``); the metrics file of a resumed run keeps the lines up to the restored step only.

Orbax's checkpoints and TensorFlow's TensorBoard writer reach ``gs://`` through their own clients
(TensorStore's and TensorFlow's GCS filesystems), which the stand-in cannot serve; everything the project
writes itself is checked here: config, metrics, sample grids, summary and export.
"""
import json
import os

import jax
import numpy as np

from sc_dpo_jax import paths
from sc_dpo_jax.train import metrics as metrics_lib
from tests.gcs_standin import gcs_root  # noqa: F401  pylint: disable=unused-import


def test_resolve_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("workdir/x")) == os.path.join(str(tmp_path), "workdir", "x")
  assert str(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert paths.is_uri("gs://bucket/run") and not paths.is_uri("/abs/run")


def _write_steps(workdir, steps, resume_step=None):
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=False, resume_step=resume_step)
  for step in steps:
    writer.write(step, {"loss": float(step) / 10, "bad": float("nan")})
  writer.close()


def test_metrics_of_a_resumed_run_keep_lines_up_to_the_restored_step(tmp_path):
  workdir = tmp_path / "run"
  _write_steps(workdir, [2, 4, 6, 8])
  with open(workdir / metrics_lib.FILE, "a") as f:
    f.write('{"step": 10, "lo')                    # a line cut short by a kill
  _write_steps(workdir, [6, 8, 10], resume_step=4)
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
  assert records[-1]["bad"] == "nan"
  _write_steps(workdir, [2], resume_step=0)      # a fresh start (no checkpoint) drops a killed attempt's lines
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [2]


def test_trainer_outputs_land_in_a_gs_workdir(gcs_root, tmp_path):  # noqa: F811
  from sc_dpo_jax.models import tiny
  from sc_dpo_jax.train import outputs
  from sc_dpo_jax.configs.dpo_family import dpo_config
  workdir = "gs://bucket/run"
  local = gcs_root / "bucket" / "run"
  paths.write_text(paths.resolve(workdir) / "config.json", '{"job": "dpo"}')
  _write_steps(workdir, [1, 2, 3])
  _write_steps(workdir, [3, 4], resume_step=2)
  assert [json.loads(line)["step"] for line in (local / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4]

  config = dpo_config("diffusion_dpo", "tiny")
  pipe = tiny.tiny_pipeline(0)
  state = type("State", (), {"params": pipe.params["unet"]})()
  outputs.sample_grid(pipe, state, {}, config, workdir, 7)
  assert (local / "samples" / "step_000007.png").stat().st_size > 0
  assert outputs.export_pipeline(pipe, state, {}, paths.resolve(workdir) / "export") == "gs://bucket/run/export"
  from safetensors.numpy import load_file
  exported = load_file(str(local / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
  flat = jax.tree_util.tree_leaves(pipe.params["unet"])
  assert len(exported) == len(flat)
  assert np.isclose(sum(float(np.abs(v).sum()) for v in exported.values()),
                    sum(float(np.abs(np.asarray(v, np.float32)).sum()) for v in flat), rtol=1e-5)
  assert (local / "config.json").read_text() == '{"job": "dpo"}'
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")     # nothing written to ./gs:/...
