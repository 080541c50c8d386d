"""transformers CLIP folders <-> our CLIP text and vision modules and their parameter trees.

    from sc_dpo_jax.models import clip_io
    text, params = clip_io.load_clip_text("path/to/sd/text_encoder")
    states = text.apply({"params": params}, input_ids).last_hidden_state
    clip_io.save_clip_text("out/text_encoder", text, params)   # transformers' from_pretrained reads it

A folder is ``config.json`` plus ``model.safetensors`` (or a sharded ``model.safetensors.index.json``); a pickled
``model.bin`` is refused unless ``allow_pickle=True``. No torch is needed for safetensors.

Which module is built follows the config's ``architectures``:

================================ ========================= ============================================
architectures                    load_clip_text            load_clip_vision
================================ ========================= ============================================
``CLIPTextModel``                no projection             (error: a text folder)
``CLIPTextModelWithProjection``  ``text_projection``       (error)
``CLIPVisionModel``              (error)                   no projection
``CLIPVisionModelWithProjection`` (error)                  ``visual_projection``
``CLIPModel``                    text tower + projection   vision tower + projection
(absent)                         projection if the file has one (the weights decide)
================================ ========================= ============================================

Loading is as strict as ``io.load_unet``: every parameter must be filled and every tensor used. The only
tensors set aside are named here: from a full ``CLIPModel`` file, the other tower (``vision_model.*`` /
``visual_projection.*`` or ``text_model.*`` / ``text_projection.*``) and ``logit_scale``; and the
``embeddings.position_ids`` buffers older transformers versions saved. transformers 5 writes a bare
``CLIPTextModel``/``CLIPVisionModel`` without the ``text_model.``/``vision_model.`` prefix; such a file is read
as if it had it. Saving always writes the prefixed names (what Stable Diffusion's ``text_encoder`` folders
hold), which every transformers version loads without missing or unexpected keys.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from sc_dpo_jax.models import attention as attention_lib
from sc_dpo_jax.models import storage, weights
from sc_dpo_jax.models.clip import CLIPTextModel, CLIPVisionModel
from sc_dpo_jax.models.clip_config import CLIPTextConfig, CLIPVisionConfig, is_full_config
from sc_dpo_jax.models.io import params_from_state_dict, read_json
from sc_dpo_jax.models.unet_config import UnsupportedConfigError
from sc_dpo_jax.models.weights import CheckpointMismatchError

CLIP_WEIGHTS = "model"
CLIP_CONTAINERS = ("layers",)

_TEXT = dict(what="text", prefix="text_model.", projection="text_projection.weight",
             plain="CLIPTextModel", projected="CLIPTextModelWithProjection",
             roots=("embeddings.", "encoder.", "final_layer_norm."),
             other=("vision_model.", "visual_projection.", "logit_scale"))
_VISION = dict(what="vision", prefix="vision_model.", projection="visual_projection.weight",
               plain="CLIPVisionModel", projected="CLIPVisionModelWithProjection",
               roots=("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."),
               other=("text_model.", "text_projection.", "logit_scale"))
_FULL = "CLIPModel"
_POSITION_IDS = re.compile(r"((text|vision)_model\.)?embeddings\.position_ids")


def load_clip_text(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "reference",
                   allow_pickle: bool = False,
                   variant: Optional[str] = None) -> Tuple[CLIPTextModel, Dict]:
  """Loads a transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` / ``CLIPModel`` folder.

  Args:
    folder: e.g. the ``text_encoder`` folder of a diffusers pipeline, or a saved text model.
    dtype, param_dtype: compute and storage dtypes (see ``models.layers``).
    attention: attention implementation (``models.attention.IMPLEMENTATIONS``; ``"auto"`` is resolved here).
    allow_pickle: accept a pickled ``model.bin`` (needs torch; unpickling can run code).
    variant: weight-file variant, e.g. ``"fp16"`` for ``model.fp16.safetensors``.

  Returns:
    ``(module, params)``; ``module.with_projection`` says whether ``text_projection`` was loaded.
  """
  return _load(folder, _TEXT, CLIPTextConfig, CLIPTextModel, dtype=dtype, param_dtype=param_dtype,
               attention=attention, allow_pickle=allow_pickle, variant=variant)


def load_clip_vision(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention: str = "reference", allow_pickle: bool = False,
                     variant: Optional[str] = None) -> Tuple[CLIPVisionModel, Dict]:
  """Loads a transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` folder.

  Arguments as :func:`load_clip_text`; ``module.with_projection`` says whether ``visual_projection`` was
  loaded.
  """
  return _load(folder, _VISION, CLIPVisionConfig, CLIPVisionModel, dtype=dtype, param_dtype=param_dtype,
               attention=attention, allow_pickle=allow_pickle, variant=variant)


def save_clip_text(folder: str, module: CLIPTextModel, params: Mapping, *, dtype=None,
                   max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that ``transformers.CLIPTextModel`` (or
  ``CLIPTextModelWithProjection`` when ``module.with_projection``) ``.from_pretrained`` loads.

  ``dtype`` converts the weights on the way out (e.g. ``jnp.float16``); by default they keep their dtype.
  Above ``max_shard_bytes`` the weights are sharded with an index, as transformers does.
  """
  _save(folder, _TEXT, module, params, dtype=dtype, max_shard_bytes=max_shard_bytes)


def save_clip_vision(folder: str, module: CLIPVisionModel, params: Mapping, *, dtype=None,
                     max_shard_bytes: Optional[int] = None) -> None:
  """Writes a folder that ``transformers.CLIPVisionModel`` (or ``CLIPVisionModelWithProjection``) loads."""
  _save(folder, _VISION, module, params, dtype=dtype, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------- internals
def _architecture(raw: Mapping, tower: Dict, source: str) -> Optional[str]:
  """The one architecture of ``raw`` this loader builds, or None when the config names none."""
  names = raw.get("architectures")
  if not names:
    return _FULL if is_full_config(raw) else None
  if isinstance(names, str):
    names = [names]
  ours = (tower["plain"], tower["projected"], _FULL)
  found = [n for n in names if n in ours]
  if len(found) != 1 or len(names) != 1:
    other = _VISION if tower is _TEXT else _TEXT
    hint = ""
    if any(n in (other["plain"], other["projected"]) for n in names):
      hint = f"; it is a {other['what']} model: use load_clip_{other['what']}"
    raise UnsupportedConfigError(f"{source}: 'architectures' = {list(names)} is not a CLIP {tower['what']} "
                                 f"model we load (one of {list(ours)}){hint}")
  return found[0]


def _select(state_dict: Mapping[str, np.ndarray], tower: Dict, architecture: Optional[str]) -> Dict:
  """The tensors of ``tower``: drops the named exclusions and adds the prefix transformers 5 leaves out."""
  out = {k: v for k, v in state_dict.items() if not _POSITION_IDS.fullmatch(k)}  # buffers, not weights
  if architecture == _FULL:
    out = {k: v for k, v in out.items() if not k.startswith(tower["other"])}
  if not any(k.startswith(tower["prefix"]) for k in out):
    out = {(tower["prefix"] + k if k.startswith(tower["roots"]) else k): v for k, v in out.items()}
  return out


def _load(folder, tower, config_cls, module_cls, *, dtype, param_dtype, attention, allow_pickle, variant):
  config_path = storage.join(folder, "config.json")
  raw = read_json(config_path)
  config = config_cls.from_transformers(raw, source=config_path)
  attention = attention_lib.resolve(attention, head_dims=(config.hidden_size // config.num_attention_heads,),
                                    dtype=dtype, what=f"CLIP {tower['what']}")
  architecture = _architecture(raw, tower, config_path)
  state_dict, source = weights.read_state_dict(folder, CLIP_WEIGHTS, allow_pickle=allow_pickle,
                                               variant=variant)
  state_dict = _select(state_dict, tower, architecture)
  has_projection = tower["projection"] in state_dict
  if architecture is None:
    with_projection = has_projection
    said = f"{config_path} names no 'architectures'; the file decides"
  else:
    with_projection = architecture != tower["plain"]
    said = f"{config_path} says 'architectures' = [{architecture!r}]"
  module = module_cls(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                      with_projection=with_projection)
  try:
    params = params_from_state_dict(module, state_dict, CLIP_CONTAINERS, source=source, param_dtype=param_dtype)
  except CheckpointMismatchError as e:
    note = ""
    if has_projection != with_projection:
      note = (f"\n  note: {said}, which has {'a' if with_projection else 'no'} {tower['projection']}, "
              f"but the file {'has' if has_projection else 'lacks'} it")
    raise CheckpointMismatchError(f"{e}{note}") from None
  return module, params


def _save(folder, tower, module, params, *, dtype, max_shard_bytes):
  config = module.config.to_transformers()
  config["architectures"] = [tower["projected"] if module.with_projection else tower["plain"]]
  leaf_dtypes = {np.dtype(dtype) if dtype is not None else np.asarray(x).dtype
                 for x in jax.tree.leaves(nn.meta.unbox(params))}
  if len(leaf_dtypes) == 1 and {str(d) for d in leaf_dtypes} <= {"float32", "float16", "bfloat16"}:
    config["dtype"] = str(leaf_dtypes.pop())
  weights.save_model_folder(folder, params, config, weights_name=CLIP_WEIGHTS, containers=CLIP_CONTAINERS,
                            library="transformers", dtype=dtype, max_shard_bytes=max_shard_bytes)
