"""``--config=configs/toy.py`` in a checkout: the config ships with the package as
``sc_dpo_jax/configs/toy.py`` (installed: ``--config=$(python -m sc_dpo_jax.configs)/toy.py``); its
docstring, with the commands, is this one's."""
from sc_dpo_jax.configs import toy as _shipped

__doc__ = _shipped.__doc__
get_config = _shipped.get_config
