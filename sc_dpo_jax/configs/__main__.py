"""``python -m sc_dpo_jax.configs``: prints the folder of the shipped configs (``--config=$(...)/duo.py:tiny``)."""
from sc_dpo_jax import configs

print(configs.folder())
