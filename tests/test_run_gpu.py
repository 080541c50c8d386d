"""``bench/run_gpu.sh`` and ``bench/collect.py`` on this CPU (``SMOKE=1``: every run at the tiny size), so the one
device call issue 9 gets works the first time: the runs, the time budget, the failure path, and the three files
that come back (results.json, table.md, runs.tar.gz) with the table's numbers taken from the runs' JSON."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run_gpu.sh")
pytest.importorskip("diffusers")
pytest.importorskip("torch")
pytestmark = pytest.mark.xdist_group("run_gpu")


def _run(out, timeout=900, **overrides):
  env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, OUT=str(out), TMPDIR=str(out.parent))
  env.update(overrides)
  return subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _results(out):
  with open(out / "results.json") as f:
    return json.load(f)


@pytest.mark.slow      # about 2 minutes alone (4-5 in the parallel suite): make test-slow; the budget and failure
def test_smoke_run_gives_the_table(tmp_path):   # paths below stay in make test

  out = tmp_path / "out"
  # The torch.compile peers take minutes on a CPU: test_compile_peers runs them (slow).
  proc = _run(out, SKIP="peer_step_compile peer_sample_compile ours_sc_dpo ours_duo_lora")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  # What the device tool brings back: at most 8 plain files, none deeper than $OUT/a/b/file.
  assert sorted(os.listdir(out)) == ["results.json", "runs.tar.gz", "table.md"]
  results = _results(out)
  runs = results["runs"]
  ran = ["ours_diffusion_dpo", "peer_step_eager", "ours_sample", "peer_sample_eager", "ours_dpo_noremat", "ours_check",
         "gpu_tests"]
  assert list(runs) == ran
  assert all(runs[name]["status"] == "ok" for name in ran), {n: r["status"] for n, r in runs.items()}
  ours, peer = runs["ours_diffusion_dpo"]["result"], runs["peer_step_eager"]["result"]
  assert ours["architecture"] == "tiny" and ours["pairs_per_s"] > 0 and ours["compiled_memory_gb"]["argument"] > 0
  assert ours["profile"]["top"] and ours["profile"]["device_ms_per_step"] > 0
  assert peer["profile"]["top"] and peer["profile"]["source"].startswith("cpu operators")
  assert ours["remat_policy"] == "convs_and_dots_saveable"
  noremat = runs["ours_dpo_noremat"]["result"]
  assert noremat["remat_policy"] == "none" and noremat["pairs_per_s"] > 0
  assert f"| {noremat['pairs_per_s']:.2f} (tiny) | ≥ 60 |" in (out / "table.md").read_text()
  assert runs["ours_sample"]["result"]["finite"] and runs["ours_sample"]["result"]["profile"]["top"]
  check = runs["ours_check"]["result"]
  assert check["ok"] and 0 < check["forward_rel_l2_vs_float32"] < 0.05 and len(check["attention_checks"]) == 4
  assert results["pytest"]["tests"] > 0 and results["pytest"]["skipped"] == results["pytest"]["tests"]  # no GPU

  table = (out / "table.md").read_text()
  assert f"| {peer['pairs_per_s']:.2f} (tiny) | not run | {ours['pairs_per_s']:.2f} (tiny) | ≥ 60 |" in table
  sample = runs["ours_sample"]["result"]["images_per_s"]
  assert f"| {runs['peer_sample_eager']['result']['images_per_s']:.2f} | not run | {sample:.2f} | ≥ 5.5 |" in table
  assert f"relative L2 **{check['forward_rel_l2_vs_float32']:.2e}**" in table
  assert "## Top costs" in table and f"`{ours['profile']['top'][0]['name']}`" in table
  with tarfile.open(out / "runs.tar.gz") as tar:
    names = set(tar.getnames())
  for name in ran:
    assert f"runs/{name}.log" in names
  assert "runs/status.tsv" in names and "runs/gpu_tests.xml" in names and "runs/ours_check.json" in names


def test_budget_skips_and_a_failing_run(tmp_path):
  out = tmp_path / "out"
  proc = _run(out, BUDGET_S="0", ONLY="ours_check peer_step_eager")
  assert proc.returncode == 0, proc.stdout[-3000:]
  runs = _results(out)["runs"]
  assert {n: r["status"] for n, r in runs.items()} == {"peer_step_eager": "skipped", "ours_check": "skipped"}
  assert "| not run (time budget) |" in (out / "table.md").read_text()

  proc = _run(out, ONLY="peer_step_eager", PEER_STEP_FLAGS="--no_such_flag")
  assert proc.returncode == 1 and "failed: peer_step_eager" in proc.stdout
  runs = _results(out)["runs"]
  assert runs["peer_step_eager"]["status"] == "failed"
  assert "FAILED (runs/peer_step_eager.log)" in (out / "table.md").read_text()


def test_missing_modules_are_named(tmp_path):
  # A Python without our dependencies (the system one; or a stand-in that cannot import anything).
  fake = tmp_path / "python"
  fake.write_text("#!/bin/sh\nexit 1\n")
  fake.chmod(0o755)
  proc = _run(tmp_path / "out", timeout=60, PYTHON=str(fake))
  assert proc.returncode == 2
  assert "missing Python modules: jax torch transformers diffusers ml_collections flax optax" in proc.stderr


@pytest.mark.slow
def test_compile_peers(tmp_path):
  out = tmp_path / "out"
  proc = _run(out, ONLY="peer_step_compile peer_sample_compile")
  assert proc.returncode == 0, proc.stdout[-4000:]
  runs = _results(out)["runs"]
  assert runs["peer_step_compile"]["result"]["compile"] and runs["peer_step_compile"]["result"]["pairs_per_s"] > 0
  assert runs["peer_sample_compile"]["result"]["images_per_s"] > 0


def test_collect_reports_a_failed_profiler_and_rejects_bad_status_lines(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("collect", os.path.join(ROOT, "bench", "collect.py"))
  collect = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(collect)
  assert "the profiler failed: RuntimeError: no CUPTI" in "\n".join(
      collect._profile_section("ours", {"error": "RuntimeError: no CUPTI"}))
  (tmp_path / "status.tsv").write_text("ours_check\tok\t3\n")
  with pytest.raises(ValueError, match=r"status.tsv:1: expected 4 tab-separated fields"):
    collect.read_runs(str(tmp_path))
