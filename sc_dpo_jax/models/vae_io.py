"""diffusers ``AutoencoderKL`` folders (a pipeline's ``vae``) <-> our :class:`~sc_dpo_jax.models.vae.AutoencoderKL`.

    from sc_dpo_jax.models import vae_io
    vae, params = vae_io.load_vae("path/to/sd/vae")
    vae_io.save_vae("out/vae", vae, params)        # diffusers.AutoencoderKL.from_pretrained reads it

Strict as ``io.load_unet``: every parameter must be filled and every tensor in the file used, with matching
shapes; a config key we cannot honour is an error that names it. No torch is needed for safetensors.

Attention weight names: diffusers >= 0.14 names the mid-block attention ``to_q``/``to_k``/``to_v``/
``to_out.0``; VAE checkpoints written before that (many SD1.x ``vae`` folders) use the deprecated names
``query``/``key``/``value``/``proj_attn``, which diffusers renames when it loads them. :func:`load_vae`
accepts both (the old names only for ``{encoder,decoder}.mid_block.attentions.<i>``, with the same linear
shapes); a file holding both names for one tensor is an error. :func:`save_vae` always writes the new names.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from sc_dpo_jax.models import attention as attention_lib
from sc_dpo_jax.models import storage, weights
from sc_dpo_jax.models.io import params_from_state_dict, read_json
from sc_dpo_jax.models.vae import AutoencoderKL
from sc_dpo_jax.models.vae_config import VAEConfig

VAE_WEIGHTS = "diffusion_pytorch_model"
VAE_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")

# Deprecated attention-block names (diffusers < 0.14) -> current names.
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_ATTENTION_KEY = re.compile(
    r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")


def convert_deprecated_attention_names(state_dict: Mapping[str, np.ndarray], *,
                                       source: str = "state dict") -> Dict[str, np.ndarray]:
  """Renames ``query/key/value/proj_attn`` of the mid-block attentions to ``to_q/to_k/to_v/to_out.0``.

  Other names pass unchanged. Raises :class:`~sc_dpo_jax.models.weights.CheckpointMismatchError` if a
  tensor is present under both its old and new name.
  """
  renamed = {}
  for name in state_dict:
    m = _DEPRECATED_ATTENTION_KEY.fullmatch(name)
    if m is not None:
      renamed[name] = f"{m.group(1)}.{_DEPRECATED_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
  both = sorted(f"{old} and {new}" for old, new in renamed.items() if new in state_dict)
  if both:
    raise weights.CheckpointMismatchError(
        f"{source} holds attention weights under both the deprecated and the current name: {both}")
  return {renamed.get(name, name): tensor for name, tensor in state_dict.items()}


def load_vae(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "reference",
             remat_policy: Optional[str] = None, allow_pickle: bool = False,
             variant: Optional[str] = None) -> Tuple[AutoencoderKL, Dict]:
  """Loads a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors weights, single or sharded).

  Args:
    folder: the ``vae`` folder of a diffusers pipeline, or a saved VAE.
    dtype, param_dtype: compute and storage dtypes (see ``models.layers``).
    attention: mid-block attention implementation (``models.attention.IMPLEMENTATIONS``; ``"auto"`` is resolved
      here: the SD VAE's single 512-wide head is beyond cuDNN, so it gets ``"xla"``).
    remat_policy: rematerialise each block under this ``jax.checkpoint_policies`` name.
    allow_pickle: accept a pickled ``diffusion_pytorch_model.bin`` (needs torch).
    variant: weight-file variant, e.g. ``"fp16"``.

  Returns:
    ``(module, params)``: params is a nested dict of ``param_dtype`` arrays.
  """
  config_path = storage.join(folder, "config.json")
  config = VAEConfig.from_diffusers(read_json(config_path), source=config_path)
  head_dims = (config.block_out_channels[-1],) if config.mid_block_add_attention else ()
  attention = attention_lib.resolve(attention, head_dims=head_dims, dtype=dtype, what="vae")
  vae = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                      remat_policy=remat_policy)
  state_dict, source = weights.read_state_dict(folder, VAE_WEIGHTS, allow_pickle=allow_pickle,
                                               variant=variant)
  state_dict = convert_deprecated_attention_names(state_dict, source=source)
  return vae, params_from_state_dict(vae, state_dict, VAE_CONTAINERS, source=source, param_dtype=param_dtype)


def save_vae(folder: str, vae: AutoencoderKL, params: Dict, dtype=None, *,
             max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (sharded above ``max_shard_bytes``),
  with diffusers' current attention names.

  ``dtype`` converts the weights on the way out (e.g. ``jnp.float16``); by default they keep their dtype.
  """
  weights.save_model_folder(folder, params, vae.config.to_diffusers(), weights_name=VAE_WEIGHTS,
                            containers=VAE_CONTAINERS, library="diffusers", dtype=dtype,
                            max_shard_bytes=max_shard_bytes)
