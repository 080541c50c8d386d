"""The safety cost model of SC-DPO: a small MLP adapter over frozen, normalised CLIP image embeddings.

THIS PROJECT'S FORMULATION (METHODS.md, "SC-DPO"): the SC-DPO abstract (arXiv 2504.14290 v1) says a safety
cost model scores how harmful an image is and is trained with a contrastive and a cost-anchoring objective; the
architecture and losses below are ours::

    C(x) = g_psi(normalize(CLIP_image(preprocess(x))))        higher = more harmful, 0 separates the classes

* ``CLIP_image`` is ``models.CLIPVisionModel(with_projection=True)`` (its ``image_embeds``), frozen: its
  parameters are an argument of every function, never closed over, never updated.
* ``preprocess`` is ``clip_preprocess.preprocess`` (CLIPImageProcessor's resize, crop and normalisation, in
  JAX), so ``cost`` takes uint8 or [0, 1] float NHWC images of any size.
* ``g_psi`` is :class:`CostAdapter`: ``len(hidden_sizes)`` dense layers with an activation, then a dense layer
  to one output (no activation, so costs are unbounded logits).
* Training minimises ``losses.cost_model.cost_loss``: ranking of ordered pairs (more, less harmful) plus
  ``anchor_weight`` x anchoring of labelled images (+1 harmful, -1 safe) at zero. Its step and train state are
  ``train.cost_steps``', the trainer (job ``cost_model``) ``train.cost_loop``'s; this module holds what
  inference needs: the model, its save/load and :class:`CostReward`.

Usage::

    clip, clip_params = models.load_clip_vision("path/to/clip")        # a CLIP with projection
    model = SafetyCostModel(clip, CostAdapter(hidden_sizes=(256,)))
    emb = embed_in_batches(model, clip_params, images)                  # precompute once (optional)
    ...                                                                 # train (train.cost_steps)
    save_cost_model("out/cost_model", model, state.params, clip_name="openai/clip-vit-large-patch14")
    model, params = load_cost_model("out/cost_model", "path/to/clip")
    costs = model.cost(params, images)                                  # [B] float32

Parameter logical axes (``models.layers``): the first kernel is ``("projection", "mlp")`` (its input is
CLIP's projection axis); further hidden kernels alternate ``("mlp", "embed")``, ``("embed", "mlp")`` as a
transformer's feed-forward does, so no kernel names one axis twice; the output kernel's output axis is
``"cost"`` (size 1, left unsharded by any rule set).

A saved cost model is a folder with ``adapter.safetensors`` (Flax layout, keys ``hidden_0.kernel`` ...) and
``cost_model.json`` (the adapter config, the embedding dimension, and the CLIP it expects: its architecture and
an optional name); loading checks that the given CLIP produces embeddings of that dimension.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sc_dpo_jax.models.clip import CLIPVisionModel, activation
from sc_dpo_jax.models.clip_config import ACTIVATIONS
from sc_dpo_jax.models.clip_io import load_clip_vision
from sc_dpo_jax.models.io import read_json
from sc_dpo_jax.models import storage
from sc_dpo_jax.models.layers import dense
from sc_dpo_jax.models.weights import CheckpointMismatchError
from sc_dpo_jax.rewards.clip_preprocess import CLIP_MEAN, CLIP_STD, preprocess

Dtype = Any
FORMAT = "sc_dpo_jax.safety_cost_model"
FORMAT_VERSION = 1
CONFIG_NAME = "cost_model.json"
WEIGHTS_NAME = "adapter.safetensors"


# ---------------------------------------------------------------------------------------------- modules
class CostAdapter(nn.Module):
  """``g_psi``: an MLP from a (normalised) embedding ``[B, D]`` to a cost ``[B]`` (see the module docstring).

  Attributes:
    hidden_sizes: widths of the hidden layers (empty: a linear cost).
    activation: a name from ``models.clip_config.ACTIVATIONS`` ("gelu", "relu", "silu", "quick_gelu", ...).
    dtype, param_dtype: compute and storage dtypes; the cost is returned in float32.
  """
  hidden_sizes: Tuple[int, ...] = (256,)
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    sizes = tuple(self.hidden_sizes)
    if any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in sizes):
      raise ValueError(f"CostAdapter hidden_sizes must be positive ints, got {self.hidden_sizes!r}")
    object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in sizes))
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CostAdapter activation {self.activation!r} is not supported; choose one of "
                       f"{ACTIVATIONS}")
    super().__post_init__()

  def dummy_inputs(self, dim: int, batch: int = 1):
    """Zero embeddings ``[batch, dim]``, for ``init``/``eval_shape``."""
    return (jnp.zeros((batch, dim), jnp.float32),)

  @nn.compact
  def __call__(self, emb: jax.Array) -> jax.Array:
    if emb.ndim != 2:
      raise ValueError(f"CostAdapter input must be embeddings [B, D], got shape {emb.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(self.activation)
    x, axis = emb.astype(self.dtype), "projection"
    for i, width in enumerate(self.hidden_sizes):
      out_axis = "mlp" if axis != "mlp" else "embed"
      x = act(dense(width, (axis, out_axis), name=f"hidden_{i}", **kw)(x))
      axis = out_axis
    return dense(1, (axis, "cost"), name="out", **kw)(x)[:, 0].astype(jnp.float32)

  def config_dict(self) -> Dict[str, Any]:
    return {"hidden_sizes": list(self.hidden_sizes), "activation": self.activation}


@dataclasses.dataclass(frozen=True)
class SafetyCostModel:
  """The frozen CLIP vision tower and the adapter, with the pure functions of the cost.

  Attributes:
    clip: ``CLIPVisionModel`` with ``with_projection=True``.
    adapter: the ``CostAdapter``.
    mean, std: the image normalisation ``clip_preprocess.preprocess`` applies (default OpenAI CLIP's).
    clip_name: what CLIP the adapter was trained on (a hub name or path); informational, written on save.
  """
  clip: CLIPVisionModel
  adapter: CostAdapter
  mean: Tuple[float, float, float] = CLIP_MEAN
  std: Tuple[float, float, float] = CLIP_STD
  clip_name: Optional[str] = None

  def __post_init__(self):
    if not isinstance(self.clip, CLIPVisionModel):
      raise TypeError(f"SafetyCostModel clip must be a models.CLIPVisionModel, got {type(self.clip).__name__}")
    if not self.clip.with_projection:
      raise ValueError("SafetyCostModel needs a CLIPVisionModel with_projection=True (the cost is a function of "
                       "CLIP's projected image embedding); load a CLIPVisionModelWithProjection or CLIPModel "
                       "folder")
    if not isinstance(self.adapter, CostAdapter):
      raise TypeError(f"SafetyCostModel adapter must be a CostAdapter, got {type(self.adapter).__name__}")
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    object.__setattr__(self, "std", tuple(float(v) for v in self.std))

  @property
  def embed_dim(self) -> int:
    """D: CLIP's ``projection_dim``, the adapter's input width."""
    return int(self.clip.config.projection_dim)

  @property
  def image_size(self) -> int:
    return int(self.clip.config.image_size)

  def init_adapter(self, rng: jax.Array) -> Dict:
    """Fresh adapter parameters (boxes of logical axes removed)."""
    return nn.meta.unbox(self.adapter.init(rng, *self.adapter.dummy_inputs(self.embed_dim))["params"])

  def embed(self, clip_params, images) -> jax.Array:
    """``normalize(CLIP_image(preprocess(images)))``: ``[B, D]`` float32 unit vectors.

    ``images``: uint8 or [0, 1] float NHWC, any size (resized and center-cropped to CLIP's ``image_size``).
    """
    pixels = preprocess(images, self.image_size, self.mean, self.std)
    emb = self.clip.apply({"params": clip_params}, pixels).image_embeds.astype(jnp.float32)
    return emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(emb), axis=-1, keepdims=True), 1e-12))

  def cost_from_embeddings(self, adapter_params, emb) -> jax.Array:
    """``g_psi(emb)``: ``[B]`` float32 costs from normalised embeddings ``[B, D]``."""
    if emb.ndim != 2 or emb.shape[-1] != self.embed_dim:
      raise ValueError(f"SafetyCostModel: embeddings must be [B, {self.embed_dim}] (CLIP's projection_dim), got "
                       f"shape {tuple(emb.shape)}")
    return self.adapter.apply({"params": adapter_params}, emb)

  def cost(self, params: Mapping, images) -> jax.Array:
    """``C(images)``: ``[B]`` float32; ``params = {"clip": clip_params, "adapter": adapter_params}``."""
    missing = {"clip", "adapter"} - set(params)
    if missing:
      raise KeyError(f"SafetyCostModel.cost params must hold 'clip' and 'adapter'; missing {sorted(missing)}")
    return self.cost_from_embeddings(params["adapter"], self.embed(params["clip"], images))


def embed_in_batches(model: SafetyCostModel, clip_params, images, batch_size: int = 64) -> np.ndarray:
  """``model.embed`` over a host array of images in jitted batches (the last one padded): ``[N, D]`` numpy.

  For precomputing the embeddings of a training set once, so that the training step skips CLIP.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"embed_in_batches: images must be a non-empty NHWC batch, got shape {images.shape}")
  fn = jax.jit(model.embed)
  out = []
  for start in range(0, images.shape[0], batch_size):
    chunk = images[start:start + batch_size]
    n = chunk.shape[0]
    if n < batch_size and images.shape[0] > batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(fn(clip_params, chunk))[:n])
  return np.concatenate(out)


# ------------------------------------------------------------------------------------------ save / load
def clip_signature(clip: CLIPVisionModel) -> Dict[str, Any]:
  """The architecture of ``clip`` a saved adapter expects (recorded in ``cost_model.json``, checked on load)."""
  cfg = clip.config
  return {"projection_dim": int(cfg.projection_dim), "image_size": int(cfg.image_size),
          "patch_size": int(cfg.patch_size), "hidden_size": int(cfg.hidden_size),
          "num_hidden_layers": int(cfg.num_hidden_layers)}


def save_cost_model(folder: str, model: SafetyCostModel, adapter_params: Mapping, *,
                    clip_name: Optional[str] = None) -> None:
  """Writes ``folder/adapter.safetensors`` and ``folder/cost_model.json`` (the CLIP weights are not saved);
  ``folder`` is local (relative or absolute) or a URI (``gs://``, through ``etils.epath``).

  ``clip_name`` (default ``model.clip_name``) records which CLIP the adapter belongs to.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(adapter_params), sep=".")
  expected = _expected_shapes(model.adapter, model.embed_dim)
  got = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if got != expected:
    raise CheckpointMismatchError(f"save_cost_model: adapter_params do not fit the model's adapter: "
                                  f"{_describe_mismatch(expected, got)}")
  storage.makedirs(folder)
  storage.write_safetensors(storage.join(folder, WEIGHTS_NAME), {k: np.asarray(v) for k, v in flat.items()},
                            metadata={"format": "flax"})
  config = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter": model.adapter.config_dict(),
            "embedding_dim": model.embed_dim,
            "clip": {"name": clip_name if clip_name is not None else model.clip_name,
                     **clip_signature(model.clip)},
            "preprocess": {"image_size": model.image_size, "mean": list(model.mean), "std": list(model.std)}}
  storage.write_json(storage.join(folder, CONFIG_NAME), config)


def load_cost_model(folder: str, clip_folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention: str = "reference") -> Tuple[SafetyCostModel, Dict]:
  """Loads a cost model saved by :func:`save_cost_model` with the CLIP vision tower in ``clip_folder``.

  Returns ``(model, params)`` with ``params = {"clip": ..., "adapter": ...}`` for ``model.cost``.
  Raises ``ValueError`` when the CLIP's embedding dimension (``projection_dim``) or architecture is not the one
  the adapter was trained on, and ``CheckpointMismatchError`` when the weights do not fit the config. Both
  folders may be local or URIs (``gs://``).
  ``dtype``, ``param_dtype`` and ``attention`` apply to CLIP (as ``models.load_clip_vision``).
  """
  config_path = storage.join(folder, CONFIG_NAME)
  config = read_json(config_path)
  if config.get("format") != FORMAT:
    raise ValueError(f"{config_path} is not a safety cost model config ('format' = {config.get('format')!r}, "
                     f"expected {FORMAT!r})")
  if config.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{config_path}: format_version {config.get('format_version')!r} is not supported "
                     f"(this code reads {FORMAT_VERSION})")
  try:
    adapter = CostAdapter(hidden_sizes=tuple(config["adapter"]["hidden_sizes"]),
                          activation=config["adapter"]["activation"])
    dim = int(config["embedding_dim"])
    expected_clip = config["clip"]
    pre = config["preprocess"]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{config_path} lacks or misstates key {e}") from None

  clip, clip_params = load_clip_vision(clip_folder, dtype=dtype, param_dtype=param_dtype, attention=attention)
  if not clip.with_projection:
    raise ValueError(f"{clip_folder} holds a CLIP vision tower without visual_projection; the cost model in "
                     f"{folder} needs projected image embeddings of dimension {dim}")
  signature = clip_signature(clip)
  if signature["projection_dim"] != dim:
    raise ValueError(f"the cost model in {folder} expects CLIP image embeddings of dimension {dim} "
                     f"(embedding_dim in {CONFIG_NAME}), but the CLIP in {clip_folder} projects to "
                     f"{signature['projection_dim']} (its projection_dim): it is not the CLIP the adapter was "
                     f"trained on ({expected_clip.get('name') or 'unnamed'})")
  differing = [k for k in signature if k in expected_clip and expected_clip[k] != signature[k]]
  if differing:
    listed = ", ".join(f"{k}: expected {expected_clip[k]}, found {signature[k]}" for k in differing)
    raise ValueError(f"the CLIP in {clip_folder} is not the architecture the cost model in {folder} was trained "
                     f"on ({expected_clip.get('name') or 'unnamed'}): {listed}")

  weights_path = storage.join(folder, WEIGHTS_NAME)
  if not storage.is_file(weights_path):
    raise FileNotFoundError(f"{weights_path} does not exist")
  flat = storage.read_safetensors(weights_path)
  expected = _expected_shapes(adapter, dim)
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    raise CheckpointMismatchError(f"{weights_path} does not fit the adapter of {config_path}: "
                                  f"{_describe_mismatch(expected, got)}")
  adapter_params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep=".")
  model = SafetyCostModel(clip, adapter, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                          clip_name=expected_clip.get("name"))
  return model, {"clip": clip_params, "adapter": adapter_params}


def _expected_shapes(adapter: CostAdapter, dim: int) -> Dict[str, Tuple[int, ...]]:
  abstract = nn.meta.unbox(jax.eval_shape(adapter.init, jax.random.PRNGKey(0), *adapter.dummy_inputs(dim)))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract["params"], sep=".").items()}


def _describe_mismatch(expected: Mapping[str, Tuple[int, ...]], got: Mapping[str, Tuple[int, ...]]) -> str:
  parts = []
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
  if missing:
    parts.append(f"missing {missing}")
  if unexpected:
    parts.append(f"unexpected {unexpected}")
  if shapes:
    parts.append("wrong shapes " + ", ".join(f"{k}: expected {expected[k]}, got {got[k]}" for k in shapes))
  return "; ".join(parts)


class CostReward:
  """The safety cost as a reward part: ``reward(images, prompts) -> (C(x) [B], {})``, prompts unused. Give it
  a negative weight in ``rewards.WeightedSum`` (lower cost, higher reward)."""

  def __init__(self, model: SafetyCostModel, params: Mapping[str, Any]):
    self.model, self.params = model, params
    self._cost = jax.jit(model.cost)

  def __call__(self, images, prompts):
    del prompts
    return np.asarray(self._cost(self.params, jnp.asarray(images)), np.float32), {}
