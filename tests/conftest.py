"""Shared test set-up: CPU-only JAX, one compilation cache per run, and the quick toy demo (``quick_workdir``)."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

from tests.subprocess_helper import run

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent JAX compilation cache per test run, made by the first process that loads this file (pytest's
# controller, before it starts the xdist workers) and inherited by the workers and every subprocess a test starts
# (tests that pass their own JAX_COMPILATION_CACHE_DIR keep theirs): a program compiled by one test is read back
# by the others that build the same one. Removed when the run ends. Set the variable to keep a cache across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="sc_dpo_jax-test-jit-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: full-size checks, not run in CI (run with -m slow)")


# The quick toy demo, run once per test session through ``main`` (the user's command): ``quick_workdir`` (the toy
# tests and the attacks' tests against its aligned models use it).
# Session scope: under xdist a worker may run another module between the tests that use it, which would tear down
# and rebuild a module-scoped fixture (the whole quick demo) in between. Its users share the xdist group
# "toy_demo", so one worker runs them all.
@pytest.fixture(scope="session")
def quick_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy") / "quick"
  cmd = [sys.executable, "-m", "sc_dpo_jax.main", "--config=configs/toy.py:quick", f"--workdir={workdir}",
         "--config.progress=false"]
  proc = run(cmd, timeout=900)
  assert f"The toy-world report is in {workdir}/report/report.md" in proc.stdout
  return workdir
