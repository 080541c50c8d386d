"""Pure linen models (UNet, and later CLIP and VAE) and their diffusers/transformers checkpoint interop."""
from sc_dpo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from sc_dpo_jax.models.attention import dot_product_attention
from sc_dpo_jax.models.io import load_unet, save_unet
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.unet_config import UNetConfig, UnsupportedConfigError, sd15_config, sd21_config, tiny_config
from sc_dpo_jax.models.weights import CheckpointMismatchError, PickleRefusedError
