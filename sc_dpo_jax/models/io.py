"""Model folders in diffusers/transformers format <-> our Flax modules and parameter trees.

    from sc_dpo_jax import models
    unet, params = models.load_unet("path/to/sd/unet")          # a diffusers 'unet' folder
    eps = unet.apply({"params": params}, latents_nhwc, timesteps, text_states)
    models.save_unet("out/unet", unet, params)                  # diffusers.UNet2DConditionModel.from_pretrained reads it

No torch is needed: safetensors files are read and written with safetensors' numpy API. Loading is strict:
every parameter must be filled and every tensor in the file used, and a config key we cannot honour is an
error that names it. Folders may be local or ``gs://`` URIs (``models.storage``); ``attention="auto"`` is
resolved to a concrete kernel when the model is loaded (``models.attention.resolve``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util
import flax.linen as nn

from sc_dpo_jax.models import attention as attention_lib
from sc_dpo_jax.models import storage, weights
from sc_dpo_jax.models.unet import UNet2DConditionModel
from sc_dpo_jax.models.unet_config import UNetConfig

UNET_WEIGHTS = "diffusion_pytorch_model"
UNET_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                   "transformer_blocks", "to_out", "net")


def read_json(path: str) -> Dict[str, Any]:
  """The JSON object in ``path`` (local or ``gs://``); errors name the file."""
  return storage.read_json(path)


def param_shapes(module: nn.Module, *inputs) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flat path -> shape of ``module``'s parameters, computed abstractly (no memory, no FLOPs)."""
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  params = nn.meta.unbox(abstract["params"])
  return {path: tuple(x.shape) for path, x in traverse_util.flatten_dict(params).items()}


def params_from_state_dict(module: nn.Module, state_dict, containers, *, source: str, param_dtype,
                           inputs=None) -> Dict:
  """The parameter tree of ``module`` (shapes from ``module.dummy_inputs()`` or ``inputs``) filled from a
  PyTorch ``state_dict`` read from ``source``, strictly (``weights.torch_to_flax``), as ``param_dtype`` arrays."""
  expected = param_shapes(module, *(module.dummy_inputs() if inputs is None else inputs))
  params = weights.torch_to_flax(state_dict, expected, containers, source=source, dtype=jnp.dtype(param_dtype))
  return jax.tree.map(jnp.asarray, params)


def load_unet(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "reference",
              remat_policy: Optional[str] = None, allow_pickle: bool = False,
              variant: Optional[str] = None) -> Tuple[UNet2DConditionModel, Dict]:
  """Loads a diffusers ``UNet2DConditionModel`` folder (``config.json`` + safetensors weights).

  Args:
    folder: the ``unet`` folder of a diffusers pipeline, or a saved UNet (local or ``gs://``).
    dtype, param_dtype: compute and storage dtypes (see ``models.layers``).
    attention: attention implementation (``models.attention.IMPLEMENTATIONS``); ``"auto"`` and ``"cudnn"`` are
      checked against this platform, the UNet's head widths and ``dtype`` here (``attention.resolve``).
    remat_policy: rematerialise each block under this ``jax.checkpoint_policies`` name.
    allow_pickle: accept a pickled ``diffusion_pytorch_model.bin`` (needs torch).
    variant: weight-file variant, e.g. ``"fp16"``.

  Returns:
    ``(module, params)``: params is a nested dict of ``param_dtype`` arrays.
  """
  config_path = storage.join(folder, "config.json")
  config = UNetConfig.from_diffusers(read_json(config_path), source=config_path)
  attention = attention_lib.resolve(attention, head_dims=attention_lib.unet_head_dims(config), dtype=dtype,
                                    what="unet")
  unet = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                              remat_policy=remat_policy)
  state_dict, source = weights.read_state_dict(folder, UNET_WEIGHTS, allow_pickle=allow_pickle,
                                               variant=variant)
  return unet, params_from_state_dict(unet, state_dict, UNET_CONTAINERS, source=source, param_dtype=param_dtype,
                                      inputs=unet.dummy_inputs(size=8))


def unet_with_attention(unet: UNet2DConditionModel, attention: str) -> UNet2DConditionModel:
  """``unet`` with attention implementation ``attention`` resolved for its head widths and compute dtype on this
  platform (``attention.resolve``: ``"auto"`` is logged and made concrete, an impossible ``"cudnn"`` raises)."""
  resolved = attention_lib.resolve(attention, head_dims=attention_lib.unet_head_dims(unet.config),
                                   dtype=unet.dtype, what="unet")
  return unet if resolved == unet.attention else unet.clone(attention=resolved)


def save_unet(folder: str, unet: UNet2DConditionModel, params: Dict, *, dtype=None,
              max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (sharded above ``max_shard_bytes``).

  ``dtype`` converts the weights on the way out (e.g. ``jnp.float16``); by default they keep their dtype.
  """
  weights.save_model_folder(folder, params, unet.config.to_diffusers(), weights_name=UNET_WEIGHTS,
                            containers=UNET_CONTAINERS, library="diffusers", dtype=dtype,
                            max_shard_bytes=max_shard_bytes)
