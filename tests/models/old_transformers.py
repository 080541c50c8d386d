"""The oldest transformers ``setup.py`` allows (4.46), installed once outside the venv's site-packages, and a
runner that tokenizes prompts with it in a subprocess.

    folder = ensure_installed()          # .venv/transformers-4.46: transformers 4.46.3, tokenizers 0.20.3, hub 0.26.5
    ids = tokenize_with_old([tokenizer_dir], prompts)   # {dir: {"CLIPTokenizer": [[...]], "CLIPTokenizerFast": ...}}

The first call runs ``pip install --target`` (11 s here with a warm pip cache, 19 s without; 10 MB of wheels);
later calls and other pytest workers find the finished folder (a lock serialises the install). Only those three
packages are installed (``--no-deps``): their other requirements (numpy, regex, requests, ...) are the venv's.
When the install fails and PyPI cannot be reached the caller is skipped with that reason; any other failure is an
error that shows pip's output.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Sequence

import pytest

from tests.subprocess_helper import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRANSFORMERS = "4.46.3"
# transformers 4.46.3 requires tokenizers>=0.20,<0.21 and huggingface-hub>=0.23.2,<1.0; these were current with it.
PACKAGES = (f"transformers=={TRANSFORMERS}", "tokenizers==0.20.3", "huggingface-hub==0.26.5")
TARGET = os.path.join(ROOT, ".venv", "transformers-4.46")
_DONE = ".installed"

# Run with TARGET first on PYTHONPATH: prints {folder: {class: ids}} for the folders and prompts given as JSON on
# stdin, with the versions it ran under. The padding and truncation are diffusers' (pad to model_max_length).
_SCRIPT = r"""
import json, sys
import tokenizers, transformers
from transformers import CLIPTokenizer, CLIPTokenizerFast
args = json.load(sys.stdin)
out = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}, "ids": {}}
for folder in args["folders"]:
  out["ids"][folder] = {}
  for cls in (CLIPTokenizer, CLIPTokenizerFast):
    tok = cls.from_pretrained(folder, local_files_only=True)
    ids = tok(args["prompts"], padding="max_length", max_length=tok.model_max_length, truncation=True)["input_ids"]
    out["ids"][folder][cls.__name__] = {"ids": ids, "model_max_length": tok.model_max_length,
                                        "pad_token": tok.pad_token}
print(json.dumps(out))
"""


def _pypi_reachable() -> bool:
  urls = ["https://pypi.org/simple/transformers/"]
  if os.environ.get("PIP_INDEX_URL"):
    urls.insert(0, os.environ["PIP_INDEX_URL"].rstrip("/") + "/transformers/")
  for url in urls:
    try:
      with urllib.request.urlopen(url, timeout=15):
        return True
    except OSError:
      continue
  return False


def ensure_installed() -> str:
  """The folder holding transformers 4.46.3 and its tokenizers/hub, installed on first use (see the module
  docstring); skips the calling test when that fails because PyPI is unreachable."""
  if os.path.exists(os.path.join(TARGET, _DONE)):
    return TARGET
  os.makedirs(os.path.dirname(TARGET), exist_ok=True)
  with open(TARGET + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(TARGET, _DONE)):
      return TARGET
    staging = f"{TARGET}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", staging, *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
      shutil.rmtree(staging, ignore_errors=True)
      if not _pypi_reachable():
        pytest.skip(f"cannot install transformers {TRANSFORMERS} for the cross-version check: PyPI is unreachable "
                    f"({' '.join(cmd)} failed: {proc.stderr.strip()[-300:]})")
      raise RuntimeError(f"installing {PACKAGES} into {staging} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(staging, _DONE), "w") as f:
      json.dump({"packages": PACKAGES, "seconds": round(time.perf_counter() - start, 1)}, f)
    shutil.rmtree(TARGET, ignore_errors=True)
    os.rename(staging, TARGET)
  return TARGET


def install_seconds() -> float:
  """How long the install that made :data:`TARGET` took (recorded by it)."""
  with open(os.path.join(TARGET, _DONE)) as f:
    return float(json.load(f)["seconds"])


def tokenize_with_old(folders: Sequence[str], prompts: Sequence[str]) -> Dict[str, Dict[str, Dict]]:
  """``{folder: {"CLIPTokenizer": {"ids", "model_max_length", "pad_token"}, "CLIPTokenizerFast": ...}}`` as
  transformers 4.46.3 loads each tokenizer folder (slow and fast) and tokenizes ``prompts`` with diffusers'
  padding; asserts the subprocess really ran 4.46.3."""
  target = ensure_installed()
  # The old transformers first on the path (before the repository and this environment's packages).
  env = dict(USE_TORCH="0", USE_TF="0", USE_FLAX="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TRANSFORMERS_VERBOSITY="error", PYTHONNOUSERSITE="1")
  proc = run([sys.executable, "-c", _SCRIPT], input=json.dumps({"folders": list(folders), "prompts": list(prompts)}),
             env=env, pythonpath=[target], cwd=target, timeout=300)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["versions"]["transformers"] == TRANSFORMERS, out["versions"]
  return out["ids"]


def as_lists(ids) -> List[List[int]]:
  return [[int(i) for i in row] for row in ids]
