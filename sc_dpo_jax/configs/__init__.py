"""The run configs, shipped with the package: ``get_config(variant)`` files for ``python -m sc_dpo_jax.main``.

    python -m sc_dpo_jax.main --config=$(python -m sc_dpo_jax.configs)/duo.py:tiny --workdir=workdir/duo

``python -m sc_dpo_jax.configs`` prints this folder (``--config`` takes a file path); in a checkout the top-level
``configs/*.py`` are two-line files that point here, so ``--config=configs/duo.py:tiny`` works as well. Each file's
docstring holds its commands and variants.

Every config is built here and nowhere else: the run configs (``NAMES``) and two builders they share,
``common`` (the variant check, the pipeline's ``model.*`` and the ``mesh*`` keys) and ``dpo_family``
(:func:`dpo_family.dpo_config`, the DPO-family trainer's keys that ``diffusion_dpo``, ``sc_dpo``, ``duo`` and
``toy`` call).
"""
import os

NAMES = ("cost_model", "diffusion_dpo", "duo", "sc_dpo", "shielddiff_rl", "toy", "unet_interop")


def folder() -> str:
  """The folder of the shipped config files."""
  return os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """The config file ``name`` (e.g. ``"duo"``), for ``--config=<path>[:variant]``."""
  if name not in NAMES:
    raise ValueError(f"no shipped config {name!r}; choose one of {NAMES}")
  return os.path.join(folder(), f"{name}.py")
