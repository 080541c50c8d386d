"""The tests' one way to run a command in a subprocess (``python -m sc_dpo_jax...``, ``python -c``, a script).

    result = run([sys.executable, "-m", "sc_dpo_jax.main", ...], timeout=300)     # asserts exit status 0
    result = run(cmd, env={"XLA_FLAGS": "..."}, status=2)                         # another expected status
    result = run(cmd, status=FAILS)                                               # any non-zero status
    job = start(cmd, tmp_path / "run.log")                                        # in the background
    output = job.wait(timeout=600)                                                # asserts exit status 0

The environment (:func:`environment`) is this process's, with the repository first on ``PYTHONPATH`` (after any
``pythonpath`` folders a test puts before it, e.g. a folder that blocks an import), JAX on the CPU
(``JAX_PLATFORMS=cpu``), then the test's ``env`` on top (a value ``None`` removes the variable). Commands run in
the repository root unless ``cwd`` says otherwise, always with a timeout. A command that exits with another
status, or runs past its timeout (then it is killed), fails the test with a message naming the command, its
status and the tail of its stdout and stderr (of its log, in the background), so a failure explains itself.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

ROOT = str(Path(__file__).resolve().parents[1])
TAIL = 4000          # characters of each stream in a failure message
FAILS = "non-zero"   # status=FAILS: any non-zero exit status is the expected one

Status = Union[int, str, None]


def environment(env: Optional[Mapping[str, Optional[str]]] = None, *,
                pythonpath: Iterable[Union[str, os.PathLike]] = ()) -> dict:
  """``os.environ`` with ``pythonpath`` + the repository before the existing ``PYTHONPATH``, ``JAX_PLATFORMS=cpu``,
  then ``env`` (``None`` values remove the variable)."""
  out = dict(os.environ)
  paths = [str(p) for p in pythonpath] + [ROOT] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
  out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
  out["JAX_PLATFORMS"] = "cpu"
  for key, value in (env or {}).items():
    if value is None:
      out.pop(key, None)
    else:
      out[key] = str(value)
  return out


def compilation_cache(folder: Union[str, os.PathLike]) -> dict:
  """The variables of a persistent JAX compilation cache in ``folder`` that keeps every program (runs of one
  test share their compilations)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def tail(text: Optional[Union[str, bytes]], limit: int = TAIL) -> str:
  if text is None:
    return ""
  if isinstance(text, bytes):
    text = text.decode(errors="replace")
  return text if len(text) <= limit else "[...]" + text[-limit:]


def describe(cmd: Sequence[str]) -> str:
  """The command as a shell line, long arguments (an inline script) shortened."""
  return shlex.join(a if len(a) <= 200 else a[:120] + f"[... {len(a) - 120} more characters]" for a in cmd)


def _expected(returncode: int, status: Status) -> bool:
  return status is None or (returncode != 0 if status == FAILS else returncode == status)


def _failure(cmd, cwd, what: str, **streams) -> str:
  parts = [f"{what}: {describe(cmd)}  (in {cwd})"]
  for name, text in streams.items():
    parts.append(f"--- {name} (last {TAIL} characters) ---\n{tail(text)}")
  return "\n".join(parts)


def run(cmd: Sequence[Union[str, os.PathLike]], *, env: Optional[Mapping[str, Optional[str]]] = None,
        pythonpath: Iterable[Union[str, os.PathLike]] = (), cwd: Union[str, os.PathLike] = ROOT,
        timeout: float = 300, status: Status = 0, input: Optional[str] = None) -> subprocess.CompletedProcess:
  """Runs ``cmd`` to the end (text output captured) and returns it; the test fails unless it exits with
  ``status`` (``FAILS``: any non-zero one; ``None``: any) within ``timeout`` seconds."""
  cmd = [os.fspath(c) for c in cmd]
  try:
    result = subprocess.run(cmd, cwd=cwd, env=environment(env, pythonpath=pythonpath), capture_output=True,
                            text=True, timeout=timeout, input=input)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(_failure(cmd, cwd, f"did not finish in {timeout:g} s (killed)", stdout=e.stdout,
                                  stderr=e.stderr)) from None
  if not _expected(result.returncode, status):
    want = "a non-zero status" if status == FAILS else f"status {status}"
    raise AssertionError(_failure(cmd, cwd, f"exited with status {result.returncode}, expected {want}",
                                  stdout=result.stdout, stderr=result.stderr))
  return result


class Background:
  """``cmd`` running in the background, stdout and stderr going to the file ``log`` (nobody has to read a pipe
  while the test does other things)."""

  def __init__(self, cmd: Sequence[Union[str, os.PathLike]], log: Union[str, os.PathLike], *,
               env: Optional[Mapping[str, Optional[str]]] = None, pythonpath: Iterable[Union[str, os.PathLike]] = (),
               cwd: Union[str, os.PathLike] = ROOT):
    self.cmd, self.log, self.cwd = [os.fspath(c) for c in cmd], Path(log), cwd
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=environment(env, pythonpath=pythonpath), stdout=out,
                                   stderr=subprocess.STDOUT)

  @property
  def returncode(self) -> Optional[int]:
    return self.proc.poll()

  def running(self) -> bool:
    return self.proc.poll() is None

  def output(self) -> str:
    """What it has written so far."""
    return self.log.read_text(errors="replace") if self.log.exists() else ""

  def fail(self, what: str):
    """Fails the test with ``what``, the command and the tail of its log."""
    raise AssertionError(_failure(self.cmd, self.cwd, what, output=self.output()))

  def wait(self, timeout: float = 600, status: Status = 0) -> str:
    """Waits for the end and returns the output; the test fails unless it exits with ``status`` (as :func:`run`)
    within ``timeout`` seconds (then it is killed)."""
    try:
      returncode = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      self.fail(f"did not finish in {timeout:g} s (killed)")
    if not _expected(returncode, status):
      want = "a non-zero status" if status == FAILS else f"status {status}"
      self.fail(f"exited with status {returncode}, expected {want}")
    return self.output()

  def send_signal(self, sig: int = signal.SIGTERM):
    if self.running():
      self.proc.send_signal(sig)

  def stop(self, sig: int = signal.SIGTERM, grace: float = 60):
    """Sends ``sig`` if it still runs, waits up to ``grace`` seconds, then kills it."""
    if self.running():
      self.proc.send_signal(sig)
      try:
        self.proc.wait(timeout=grace)
      except subprocess.TimeoutExpired:
        self.kill()

  def kill(self):
    if self.running():
      self.proc.kill()
    self.proc.wait()


def start(cmd: Sequence[Union[str, os.PathLike]], log: Union[str, os.PathLike], **kwargs) -> Background:
  """``Background(cmd, log, **kwargs)``: ``cmd`` started in the background."""
  return Background(cmd, log, **kwargs)
