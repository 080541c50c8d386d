"""The ``unet_interop`` job end to end through ``python -m sc_dpo_jax.main`` (what ``make demo`` runs)."""
import json
import sys

import numpy as np
import pytest

from sc_dpo_jax import diffusion, jobs, models
from tests.subprocess_helper import run


@pytest.mark.slow   # 70-130 s; the trainers' e2e tests cover main -> export -> diffusers in `make test`
def test_main_runs_the_job_and_exports_a_model_diffusers_reads(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "sc_dpo_jax.main", "--config=configs/unet_interop.py", f"--workdir={workdir}",
         "--config.train.steps=30", "--config.data.num_examples=16", "--config.eval_batch_size=4",
         "--config.check_with_diffusers=yes", "--config.schedule.prediction_type=epsilon"]
  run(cmd, timeout=600)

  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["import_max_abs_diff"] == 0.0 and summary["export_reload_max_abs_diff"] == 0.0
  assert summary["diffusers_max_abs_diff"] < 1e-4
  # Thirty Adam steps train: the held-out loss falls by a fifth at least (the demo's default 120 steps: 1.35 ->
  # 0.47), and the export holds the new weights.
  assert summary["eval_loss_after"] < 0.8 * summary["eval_loss_before"], summary
  _, initial = models.load_unet(str(workdir / "initial" / "unet"))
  _, exported = models.load_unet(str(workdir / "export" / "unet"))
  kernel = ("conv_in", "kernel")
  assert not np.allclose(initial[kernel[0]][kernel[1]], exported[kernel[0]][kernel[1]])

  losses = np.loadtxt(workdir / "train_loss.tsv", skiprows=1)
  assert losses.shape == (30, 2) and np.all(np.isfinite(losses[:, 1]))
  assert diffusion.load_schedule(str(workdir / "export" / "scheduler")).prediction_type == "epsilon"
  config = json.loads((workdir / "config.json").read_text())
  assert config["train"]["steps"] == 30


def test_unknown_job_lists_the_known_ones():
  with pytest.raises(ValueError, match="config.job = 'nope'.*unet_interop"):
    jobs.get("nope")
