"""Two-process runs of the safety cost-model trainer and of the ShieldDiff-style RL trainer, as a pod launch runs
them (``launch/local.sh --processes 2 --cpu-devices 1``: two JAX processes on localhost, gloo collectives), plus
the cost trainer's file handling in-process (what a process other than 0 reads and does not write; a ``gs://``
workdir through ``tests/gcs_standin.py``).

* Cost model (``configs/cost_model.py:tiny``, 12 steps, a checkpoint every 4): every process trains the same
  adapter on the embeddings process 0 wrote, so the two-process export must equal a one-process run's
  **bit for bit** (tolerance 0: the same single-device programs on the same inputs; the processes exchange
  nothing but barriers and the stop-signal flag). Checked too: exit 0, checkpoints 4, 8 and 12, no warning that
  a process's state differs from process 0's (the trainer compares digests at each checkpoint), one summary.
* RL (``configs/shielddiff_rl.py:tiny``, 2 iterations, a checkpoint each; 2 samples of 1 prompt per process and
  one trained transition per trajectory, ``rl.timestep_fraction=0.25``, no sample grids): exit 0 past its first
  checkpoint, both checkpoints and the export written.

The three launches start together with the module (a fixture) and run side by side: the runs wait at barriers
and on each other much of the time, so on 2 cores the file takes about the longest run (RL) rather than the sum.
"""
import json
import os
import sys

import numpy as np
import pytest

from tests.gcs_standin import gcs_root  # noqa: F401  pylint: disable=unused-import
from tests.parallel.test_sharding import FAST_COMPILE
from tests.subprocess_helper import ROOT, start

pytestmark = pytest.mark.xdist_group("multihost")

COST_STEPS, COST_EVERY = 12, 4
RL_ITERATIONS = 2
DIFFERS = "differs from process 0's"


def _cost_args(workdir):
  return [f"--config={ROOT}/configs/cost_model.py:tiny", f"--workdir={workdir}",
          f"--config.train.steps={COST_STEPS}", f"--config.train.checkpoint_every={COST_EVERY}",
          f"--config.train.log_every={COST_EVERY}", f"--config.train.eval_every={COST_EVERY}",
          "--config.train.progress=false"]


def _rl_args(workdir):
  return [f"--config={ROOT}/configs/shielddiff_rl.py:tiny", f"--workdir={workdir}",
          f"--config.train.iterations={RL_ITERATIONS}", "--config.train.checkpoint_every=1",
          "--config.train.progress=false", "--config.train.eval_prompts=()", "--config.rl.samples_per_iteration=2",
          "--config.rl.samples_per_prompt=2", "--config.rl.timestep_fraction=0.25"]


def _launch(tmp, name, main_args, processes):
  """One ``launch/local.sh`` run in the background, its output in ``tmp/<name>.log``."""
  cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), "--python", sys.executable, "--cpu-devices", "1"]
  if processes > 1:
    cmd += ["--processes", str(processes)]
  return start([*cmd, "--", *main_args], tmp / f"{name}.log",
               env={"TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": FAST_COMPILE})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost_trainers")
  dirs = {name: tmp / name for name in ("rl_two", "cost_two", "cost_one")}
  launches = {
      "rl_two": _launch(tmp, "rl_two", _rl_args(dirs["rl_two"]), 2),          # the longest first
      "cost_two": _launch(tmp, "cost_two", _cost_args(dirs["cost_two"]), 2),
      "cost_one": _launch(tmp, "cost_one", _cost_args(dirs["cost_one"]), 1),
  }
  try:
    yield launches, dirs
  finally:
    for launch in launches.values():
      launch.stop()          # SIGTERM: the launcher passes it on and waits for its processes (then SIGKILL)


def _adapter(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "export", "adapter.safetensors"))


def _steps(folder):
  return sorted(int(p) for p in os.listdir(folder) if p.isdigit())


def _printed_summaries(text, process):
  """The JSON summaries ``sc_dpo_jax.main`` printed on ``process`` (its lines start with ``[process] ``)."""
  lines = [line[len(f"[{process}] "):] for line in text.splitlines() if line.startswith(f"[{process}] ")]
  out, block = [], None
  for line in lines:
    if line == "{":
      block = [line]
    elif block is not None:
      block.append(line)
      if line == "}":
        out.append(json.loads("\n".join(block)))
        block = None
  return out


def test_cost_model_two_processes_checkpoint_and_export_what_one_process_does(runs):
  launches, dirs = runs
  text = launches["cost_two"].wait(timeout=400)
  assert "Traceback" not in text and DIFFERS not in text, text[-4000:]
  two = dirs["cost_two"]
  assert _steps(two / "checkpoints") == [4, 8, 12]
  summary = json.loads((two / "summary.json").read_text())
  assert summary["final_step"] == COST_STEPS and not summary["stopped_by_signal"], summary
  assert summary["train_data"]["embeddings"]["cached"] is False          # process 0 embedded the pairs
  assert summary["eval_final"]["eval/loss"] < summary["eval_at_start"]["eval/loss"], summary
  assert _printed_summaries(text, 0) == [summary] and _printed_summaries(text, 1) == []
  assert sorted(p.name for p in (two / "export").iterdir()) == ["adapter.safetensors", "cost_model.json"]
  leftovers = [str(p) for p in two.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
  assert not leftovers, leftovers
  logged = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
  assert logged == [0, 4, 8, 12], logged                                  # one writer: no line twice

  launches["cost_one"].wait(timeout=400)
  got, want = _adapter(two), _adapter(dirs["cost_one"])
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), \
        f"{k}: two-process export differs from one process's by {np.max(np.abs(got[k] - want[k]))}"


def test_rl_two_processes_run_past_a_checkpoint_and_finish(runs):
  launches, dirs = runs
  text = launches["rl_two"].wait(timeout=400)
  assert "Traceback" not in text, text[-4000:]
  rl = dirs["rl_two"]
  assert _steps(rl / "checkpoints") == [1, 2]
  summary = json.loads((rl / "summary.json").read_text())
  assert summary["final_iteration"] == RL_ITERATIONS and summary["optimizer_steps"] == 2 * RL_ITERATIONS, summary
  assert (rl / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
  logged = [json.loads(line)["step"] for line in (rl / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2], logged
  for process in (0, 1):       # both processes ran the loop on one mesh over the two
    assert any(line.startswith(f"[{process}] ") and "over 2 processes" in line for line in text.splitlines())


# -- in-process: what process 0 writes and the others read; a gs:// workdir ---------------------------------------


def _pairs(n=3, dim=4):
  from sc_dpo_jax.data import cost_pairs
  rng = np.random.default_rng(0)
  return cost_pairs.PairSet(emb_chosen=rng.normal(size=(n, dim)).astype(np.float32),
                            emb_rejected=rng.normal(size=(n, dim)).astype(np.float32),
                            cost_chosen=np.zeros(n, np.float32), cost_rejected=np.ones(n, np.float32))


def test_other_processes_read_the_embeddings_process_0_wrote_and_write_nothing(tmp_path, monkeypatch):
  import jax

  from sc_dpo_jax.train import cost_data
  path = tmp_path / "embeddings" / "train.npz"
  pairs = _pairs()
  _, info = cost_data.shared_embeddings(str(path), {"v": 1}, lambda: (pairs, 2))
  assert info["cached"] is False and path.is_file() and not (tmp_path / "embeddings" / "train.npz.tmp").exists()
  before = (path.stat().st_mtime_ns, path.read_bytes())

  def compute():
    raise AssertionError("a process other than 0 computed the embeddings")

  monkeypatch.setattr(jax, "process_index", lambda: 1)      # process 1 of 1 (its barrier is then a no-op)
  got, info = cost_data.shared_embeddings(str(path), {"v": 1}, compute)
  assert info == {"cached": True, "bad_records": 2, "seconds": 0.0}
  for name, value in pairs.arrays().items():
    np.testing.assert_array_equal(getattr(got, name), value)
  assert (path.stat().st_mtime_ns, path.read_bytes()) == before
  with pytest.raises(FileNotFoundError, match="shared filesystem"):
    cost_data.shared_embeddings(str(path), {"v": 2}, compute)         # process 0 made other embeddings
  assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_cost_model_files_in_a_gs_workdir(gcs_root, tmp_path):  # noqa: F811
  import jax

  from sc_dpo_jax.rewards import cost_model as cost_lib
  from sc_dpo_jax.train import cost_data
  from sc_dpo_jax.configs.cost_model import cost_model_config
  workdir = "gs://bucket/run"
  local = gcs_root / "bucket" / "run"
  config = cost_model_config("tiny")
  clip, clip_params, clip_folder = cost_data.load_clip(config, workdir)
  assert clip_folder == f"{workdir}/clip" and (local / "clip" / "config.json").is_file()

  pairs = _pairs(dim=clip.config.projection_dim)
  _, info = cost_data.cached_embeddings(f"{workdir}/embeddings/train.npz", {"v": 1}, lambda: (pairs, 0))
  assert info["cached"] is False and (local / "embeddings" / "train.npz").is_file()
  got, info = cost_data.cached_embeddings(f"{workdir}/embeddings/train.npz", {"v": 1}, None)
  assert info["cached"] is True
  np.testing.assert_array_equal(got.emb_rejected, pairs.emb_rejected)

  model = cost_lib.SafetyCostModel(clip, cost_lib.CostAdapter(hidden_sizes=(8,)), clip_name=clip_folder)
  params = model.init_adapter(jax.random.PRNGKey(0))
  cost_lib.save_cost_model(f"{workdir}/export", model, params)
  assert sorted(p.name for p in (local / "export").iterdir()) == ["adapter.safetensors", "cost_model.json"]
  loaded, loaded_params = cost_lib.load_cost_model(f"{workdir}/export", clip_folder)
  for a, b in zip(jax.tree.leaves(loaded_params["adapter"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = pairs.emb_chosen
  np.testing.assert_allclose(np.asarray(loaded.cost_from_embeddings(loaded_params["adapter"], x)),
                             np.asarray(model.cost_from_embeddings(params, x)), rtol=0, atol=0)

  with pytest.raises(ValueError, match="config.data.train is empty and the workdir is gs://bucket/run"):
    cost_data.open_sources(config, workdir, resolution=32)
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")     # nothing written to ./gs:/...
