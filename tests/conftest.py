"""Shared test set-up: CPU-only JAX, and builders of tiny PyTorch reference models saved in diffusers format."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# In-process tests compile many small programs and run each a few times: LLVM's optimisations cost more than
# they save (measured on tests/models/test_unet_parity.py and test_pipeline.py: 27% less CPU time, 20% less
# wall time, the same results within every test's tolerance). Only this process and its workers get them:
# ``tests.subprocess_helper.environment`` gives subprocesses the caller's own XLA_FLAGS back (the quick toy
# demo samples thousands of images and wants optimised code), unless a test passes its own.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = FAST_XLA_FLAGS
  os.environ["SC_DPO_TESTS_FAST_XLA"] = "1"



def pytest_configure(config):
  config.addinivalue_line("markers", "slow: full-size checks, not run in CI (run with -m slow)")
