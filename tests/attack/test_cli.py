"""``python -m sc_dpo_jax.attack``: dispatch by name, each attack's flags only, clear errors."""
import importlib
import sys

from sc_dpo_jax.attack import ATTACKS
from tests.subprocess_helper import run


def test_unknown_and_missing_attack_names_are_usage_errors():
  proc = run([sys.executable, "-m", "sc_dpo_jax.attack", "nope"], status=2, timeout=120)
  assert "unknown attack 'nope'" in proc.stderr and "ring_a_bell" in proc.stderr
  proc = run([sys.executable, "-m", "sc_dpo_jax.attack"], status=2, timeout=120)
  assert "usage: python -m sc_dpo_jax.attack <name>" in proc.stdout


def test_help_lists_the_chosen_attacks_flags():
  # absl exits with status 1 after --help
  proc = run([sys.executable, "-m", "sc_dpo_jax.attack", "ring_a_bell", "--help"], status=None, timeout=120)
  assert "--generations" in proc.stdout and "--blocklist" in proc.stdout


def test_the_attack_modules_import_side_by_side_as_libraries():
  # Flags are the command's (define_flags), not defined on import: the modules share flag names.
  from absl import flags, logging  # noqa: F401  (absl.logging defines its own flags on first import)
  before = set(flags.FLAGS)
  for name in ATTACKS:
    module = importlib.import_module(ATTACKS[name])
    assert callable(module.define_flags) and callable(module.main)
  assert set(flags.FLAGS) == before
