"""Shared test set-up: CPU-only JAX, and builders of tiny PyTorch reference models saved in diffusers format."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")



def pytest_configure(config):
  config.addinivalue_line("markers", "slow: full-size checks, not run in CI (run with -m slow)")
