"""``python -m sc_dpo_jax.attack <name> [flags]``: runs the attack ``name`` (``ATTACKS``) with its own flags."""
import importlib
import sys

from absl import app, flags

from sc_dpo_jax.attack import ATTACKS


def _usage() -> str:
  return ("usage: python -m sc_dpo_jax.attack <name> [flags]   (name: " + ", ".join(ATTACKS) +
          "; `python -m sc_dpo_jax.attack <name> --help` lists its flags)")


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(sys.argv) >= 2 else 2)
  name = sys.argv[1]
  if name not in ATTACKS:
    print(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(ATTACKS[name])
  module.define_flags()   # only the chosen attack's flags: the attacks share names (--out, --seed, --model)
  # --help lists them (define_flag_table defines them in this package's module)
  flags.adopt_module_key_flags(sys.modules["sc_dpo_jax.attack"])
  app.run(module.main, argv=[f"{sys.argv[0]} {name}"] + sys.argv[2:])


if __name__ == "__main__":
  main()
