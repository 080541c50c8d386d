"""Shared test set-up: CPU-only JAX, and builders of tiny PyTorch reference models saved in diffusers format."""
import atexit
import os
import shutil
import tempfile

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
