"""``python -m sc_dpo_jax.bench`` runs a method's step on a CPU and never imports TensorFlow (GPU images lack it)."""
import json
import sys

from tests.subprocess_helper import ROOT, run


def _bench_without_tensorflow(tmp_path, *flags):
  """Runs the benchmark with ``flags`` where importing tensorflow fails; returns (its JSON, its stdout)."""
  blocker = tmp_path / "blocker" / "tensorflow"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('the benchmark must not import tensorflow')\n")
  out = tmp_path / "bench.json"
  result = run([sys.executable, "-m", "sc_dpo_jax.bench", *flags, f"--json={out}"], pythonpath=[blocker.parent],
               env={"XLA_FLAGS": "--xla_backend_optimization_level=0"}, timeout=300)
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


def test_check_on_trained_weights_without_tensorflow(tmp_path):
  # The toy world's trained UNet: bf16 compute within the 1e-2 of float32, and above the error that
  # rounding the weights alone makes; the XLA attention kernel within bf16 tolerance of the reference.
  data, stdout = _bench_without_tensorflow(
      tmp_path, f"--config={ROOT}/configs/diffusion_dpo.py:tiny", "--mode=check", "--config.model.attention=xla",
      "--config.model.dtype=bfloat16", f"--unet_path={ROOT}/sc_dpo_jax/toy/assets/base/pipeline/unet")
  assert data["ok"] and data["forward_ok"] and data["architecture"] == "loaded"
  assert 0 < data["weights_only_rel_l2"] < data["forward_rel_l2_vs_float32"] < 1e-2
  assert len(data["attention_checks"]) == 4 and all(a["ok"] for a in data["attention_checks"])
  assert data["forward_gflop_per_image_xla"] > 0 and "rounding the weights alone" in stdout


def test_memory_estimate_without_tensorflow(tmp_path):
  data, stdout = _bench_without_tensorflow(tmp_path, f"--config={ROOT}/configs/sc_dpo.py:tiny", "--mode=memory")
  assert data["mode"] == "memory" and data["method"] == "sc_dpo" and data["policy_images"] == 16
  assert data["predicted_gb"] > data["state_gb"] > 0 and "predicted peak" in stdout
