"""``bench/peer_torch.py``, the PyTorch peer of the benchmark: its DPO loss is the official formula, and its tiny
step and sampling modes run on a CPU."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from tests.subprocess_helper import ROOT, run

SCRIPT = os.path.join(ROOT, "bench", "peer_torch.py")
pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


def _peer():
  spec = importlib.util.spec_from_file_location("peer_torch", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(tmp_path, *args):
  out = tmp_path / "peer.json"
  result = run([sys.executable, SCRIPT, "--arch=tiny", "--device=cpu", f"--json={out}", *args], timeout=120)
  return result.stdout, json.loads(out.read_text())


def test_dpo_loss_is_the_official_formula():
  rng = np.random.default_rng(0)
  beta = 5000.0
  model_err = rng.uniform(0.05, 0.2, size=16)
  ref_err = model_err + rng.normal(scale=1e-3, size=16)
  loss, inside = _peer().dpo_loss(torch.tensor(model_err), torch.tensor(ref_err), beta)
  model_diff = model_err[:8] - model_err[8:]
  ref_diff = ref_err[:8] - ref_err[8:]
  want_inside = -0.5 * beta * (model_diff - ref_diff)
  want = np.mean(np.logaddexp(0.0, -want_inside))          # -log sigmoid(x) = log(1 + exp(-x))
  np.testing.assert_allclose(inside.numpy(), want_inside, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-6)


def test_tiny_step_runs_on_cpu(tmp_path):
  stdout, data = _run(tmp_path, "--mode=step", "--steps=2", "--warmup=1")
  assert "pairs/s" in stdout and "peak memory n/a" in stdout
  assert data["batch_pairs"] == 8 and data["pairs_per_s"] > 0 and np.isfinite(data["loss"])
  assert data["tflop_per_step"] > 0 and data["peak_memory_gb"] is None


def test_tiny_sample_runs_on_cpu(tmp_path):
  stdout, data = _run(tmp_path, "--mode=sample", "--sample_steps=2", "--steps=1", "--warmup=1")
  assert "images/s" in stdout
  assert data["batch"] == 16 and data["sample_steps"] == 2 and data["images_per_s"] > 0 and data["finite"]
  assert data["image_shape"] == [3, 16, 16]


def test_flop_count_of_sd15_is_the_issues_accounting(tmp_path):
  _, data = _run(tmp_path, "--mode=flops")   # tiny
  assert data["gflop_per_image"] > 0
  out = tmp_path / "sd15.json"
  run([sys.executable, SCRIPT, "--arch=sd15", "--mode=flops", f"--json={out}"], timeout=300)
  sd15 = json.loads(out.read_text())
  # Issue 9: 677 GFLOP per image = convolutions and linear layers; the attention products come on top.
  assert sd15["conv_and_linear_gflop"] == pytest.approx(677.2, abs=0.1)
  assert sd15["attention_gflop"] == pytest.approx(126.1, abs=0.1)
  assert sd15["gflop_per_image"] == pytest.approx(sd15["conv_and_linear_gflop"] + sd15["attention_gflop"])
  assert sd15["params_m"] == pytest.approx(859.52, abs=0.01)
