"""The toy world: every alignment method on the shipped tiny model, evaluated by an exact judge (``make demo``).

  python -m sc_dpo_jax.main --config=configs/toy.py --workdir=workdir/demo
  python -m sc_dpo_jax.main --config=configs/toy.py:quick --workdir=workdir/quick       # SC-DPO only, smaller

Any key can be overridden, including each method's whole trainer config, e.g.
``--config.methods=sc_dpo,duo --config.sc_dpo.train.steps=400 --config.world.unsafe=blue`` (another unsafe
colour needs a base model that was pretrained with it: the shipped one knows every colour, so any works).
Keys and defaults: ``sc_dpo_jax/toy/config.py``; stages: ``sc_dpo_jax/toy/demo.py`` and ``README.md`` for
what the report holds.
"""
from sc_dpo_jax.toy.config import toy_config


def get_config(variant="default"):
  return toy_config(variant)
