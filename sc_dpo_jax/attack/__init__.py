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
