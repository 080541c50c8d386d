"""``python -m sc_dpo_jax.bench`` runs a method's step on a CPU and never imports TensorFlow (GPU images lack it)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_without_tensorflow(tmp_path, *flags):
  """Runs the benchmark with ``flags`` where importing tensorflow fails; returns (its JSON, its stdout)."""
  blocker = tmp_path / "blocker" / "tensorflow"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('the benchmark must not import tensorflow')\n")
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]),
             XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-m", "sc_dpo_jax.bench", *flags, f"--json={out}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text()), result.stdout


def test_bench_tiny_duo_without_tensorflow(tmp_path):
  data, stdout = _bench_without_tensorflow(tmp_path, f"--config={ROOT}/configs/duo.py:tiny", "--steps=2",
                                           "--warmup=1", "--peak_tflops=1")
  assert data["method"] == "duo" and data["lora"] and data["batch_pairs"] == 8
  assert data["pairs_per_s"] > 0 and data["tflop_per_step_per_device"] > 0 and 0 < data["mfu"] < 1
  assert "pairs/s" in stdout


def test_bench_tiny_sample_without_tensorflow(tmp_path):
  data, stdout = _bench_without_tensorflow(tmp_path, f"--config={ROOT}/configs/diffusion_dpo.py:tiny",
                                           "--mode=sample", "--sample_steps=2", "--steps=1", "--warmup=1")
  assert data["mode"] == "sample" and data["batch"] == 16 and data["sample_steps"] == 2
  assert data["images_per_s"] > 0 and data["finite"] and data["image_shape"] == [16, 16, 3]
  assert "images/s" in stdout
