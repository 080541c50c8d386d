"""tests/subprocess_helper.py: the environment it gives, and failures that show the command and its output."""
import os
import sys

import pytest

from tests import subprocess_helper as sp


def test_environment_puts_the_repository_on_the_path_and_jax_on_the_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", "/elsewhere")
  monkeypatch.setenv("GONE", "1")
  env = sp.environment({"EXTRA": 3, "GONE": None}, pythonpath=[tmp_path])
  assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), sp.ROOT, "/elsewhere"]
  assert env["JAX_PLATFORMS"] == "cpu" and env["EXTRA"] == "3" and "GONE" not in env
  assert sp.environment({"JAX_PLATFORMS": "cuda"})["JAX_PLATFORMS"] == "cuda"
  result = sp.run([sys.executable, "-c", "import os, sc_dpo_jax; print(os.getcwd(), sc_dpo_jax.__file__)"],
                  cwd=tmp_path, timeout=60)
  cwd, package = result.stdout.split()
  assert cwd == str(tmp_path) and package.startswith(os.path.join(sp.ROOT, "sc_dpo_jax"))


def test_a_wrong_status_fails_with_the_tail_of_both_streams():
  code = "import sys; print('x' * 5000 + 'OUT-END'); sys.stderr.write('ERR-END'); sys.exit(3)"
  with pytest.raises(AssertionError) as e:
    sp.run([sys.executable, "-c", code], timeout=60)
  message = str(e.value)
  assert message.startswith("exited with status 3, expected status 0: ") and "-c" in message
  assert "OUT-END" in message and "ERR-END" in message and len(message) < 2 * sp.TAIL + 1000
  assert sp.run([sys.executable, "-c", code], status=3, timeout=60).stderr == "ERR-END"
  assert sp.run([sys.executable, "-c", code], status=sp.FAILS, timeout=60).returncode == 3
  with pytest.raises(AssertionError, match="exited with status 0, expected a non-zero status"):
    sp.run([sys.executable, "-c", "pass"], status=sp.FAILS, timeout=60)


def test_a_timeout_fails_with_what_was_printed():
  with pytest.raises(AssertionError, match=r"(?s)did not finish in 1 s \(killed\).*started"):
    sp.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout=1)


def test_background(tmp_path):
  job = sp.start([sys.executable, "-c", "import sys; print('out'); sys.stderr.write('err')"], tmp_path / "a.log")
  assert job.wait(timeout=60) in ("out\nerr", "errout\n") and job.returncode == 0
  job = sp.start([sys.executable, "-c", "import sys; print('bad'); sys.exit(4)"], tmp_path / "b.log")
  with pytest.raises(AssertionError, match=r"(?s)exited with status 4, expected status 0.*--- output.*bad"):
    job.wait(timeout=60)
  job = sp.start([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "c.log")
  job.stop(grace=10)
  assert job.returncode == -15
