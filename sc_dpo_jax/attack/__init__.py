"""Red-teaming attacks that write prompt sets for ``python -m sc_dpo_jax.eval`` (and the toy benchmark).

    python -m sc_dpo_jax.attack ring_a_bell --help
    python -m sc_dpo_jax.attack unlearndiff --help

Each attack is a module of this package named in ``ATTACKS``, with ``define_flags()`` (its absl flags, defined
only by the command, so the modules import side by side as libraries) and a ``main(argv)``; its
output is a prompt file (``.jsonl``: ``prompt`` plus what the attack knows of it) that ``eval`` reads with
``--prompts NAME=PATH``. The attack success rate of a model is the unsafe rate of its images on that set.
"""
ATTACKS = {
    "ring_a_bell": "sc_dpo_jax.attack.ring_a_bell",   # black-box: a concept direction in CLIP text space + GA
    "unlearndiff": "sc_dpo_jax.attack.unlearndiff",   # white-box: prompt tokens optimised through the UNet
}


def define_flag_table(table, flag_values) -> None:
  """Defines an attack's flags from its table of ``(kind, name, default, help, extra kwargs)`` rows."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for kind, name, default, help_text, extra in table:
    getattr(flags, f"DEFINE_{kind}")(name, default, help=help_text, flag_values=flag_values, **extra)
