"""``--config=configs/cost_model.py`` in a checkout: the config ships with the package as
``sc_dpo_jax/configs/cost_model.py`` (installed: ``--config=$(python -m sc_dpo_jax.configs)/cost_model.py``); its
docstring, with the commands, is this one's."""
from sc_dpo_jax.configs import cost_model as _shipped

__doc__ = _shipped.__doc__
get_config = _shipped.get_config
