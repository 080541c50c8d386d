"""``--config=configs/shielddiff_rl.py`` in a checkout: the config ships with the package as
``sc_dpo_jax/configs/shielddiff_rl.py`` (installed: ``--config=$(python -m sc_dpo_jax.configs)/shielddiff_rl.py``); its
docstring, with the commands, is this one's."""
from sc_dpo_jax.configs import shielddiff_rl as _shipped

__doc__ = _shipped.__doc__
get_config = _shipped.get_config
