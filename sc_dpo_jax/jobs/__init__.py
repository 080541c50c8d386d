"""The jobs ``sc_dpo_jax.main`` can run, by the name in ``config.job``.

Each job is a module with ``run(config, workdir) -> dict`` (a summary of what it measured). Modules are
imported only when their job is chosen, so a job's heavy dependencies never slow down another.
"""
import importlib
from typing import Any, Callable, Dict

JOBS: Dict[str, str] = {
    "unet_interop": "sc_dpo_jax.jobs.unet_interop",
    "dpo": "sc_dpo_jax.jobs.dpo",
    "cost_model": "sc_dpo_jax.jobs.cost_model",
    "rl": "sc_dpo_jax.jobs.rl",
    "toy": "sc_dpo_jax.toy.demo",
}


def get(name: str) -> Callable[..., Dict[str, Any]]:
  """The ``run`` function of job ``name``."""
  if name not in JOBS:
    raise ValueError(f"config.job = {name!r} is not a job; choose one of {sorted(JOBS)}")
  return importlib.import_module(JOBS[name]).run
