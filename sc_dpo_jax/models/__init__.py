"""Pure linen models (UNet, CLIP, VAE), their diffusers/transformers checkpoint interop, and the pipeline."""
from sc_dpo_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from sc_dpo_jax.models.attention import dot_product_attention
from sc_dpo_jax.models.attention import resolve as resolve_attention
from sc_dpo_jax.models.clip import CLIPTextModel, CLIPTextOutput, CLIPVisionModel, CLIPVisionOutput
from sc_dpo_jax.models.clip_config import (CLIPTextConfig, CLIPVisionConfig, clip_vit_l14_text_config,
                                           clip_vit_l14_vision_config, openclip_vit_h14_text_config,
                                           tiny_text_config, tiny_vision_config)
from sc_dpo_jax.models.clip_io import load_clip_text, load_clip_vision, save_clip_text, save_clip_vision
from sc_dpo_jax.models.io import load_unet, save_unet, unet_with_attention
from sc_dpo_jax.models.pipeline import StableDiffusion, load_pipeline, save_pipeline
from sc_dpo_jax.models.tokenizer import Tokenizer, load_tokenizer
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.unet_config import UNetConfig, UnsupportedConfigError, sd15_config, sd21_config, tiny_config
from sc_dpo_jax.models.vae import AutoencoderKL, DiagonalGaussian, decode_latents, encode_to_latents
from sc_dpo_jax.models.vae_config import VAEConfig, sd_vae_config, tiny_vae_config
from sc_dpo_jax.models.vae_io import load_vae, save_vae
from sc_dpo_jax.models.weights import CheckpointMismatchError, PickleRefusedError
