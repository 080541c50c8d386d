"""The quick toy demo, run once per test session through ``main`` (the user's command): ``quick_workdir``."""
import sys

import pytest

from tests.subprocess_helper import run


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
