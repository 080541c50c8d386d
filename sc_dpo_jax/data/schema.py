"""The record schema: what one TFRecord of a pair or prompt dataset holds (``tf.train.Example`` features).

Every dataset of this project is a folder of TFRecord shards whose records are ``tf.train.Example`` protos
with the features below, plus a JSON description of which fields it has (:class:`RecordSpec`). The folders
are written by the TFDS builders (``data.builders``, from the public formats) and by ``data.precompute``
(latents and text states); the input pipeline (``data.pipeline``) reads both the same way.

**Pair records** (``kind = "pair"``), one preference pair each:

====================== ============ ==================================================================
field                  stored as    meaning
====================== ============ ==================================================================
``prompt``             bytes        the prompt (UTF-8)
``prompt_chosen``      bytes        optional: the chosen image's own prompt (DUO: the safe prompt x+ was made
                                    with; ``has_chosen_prompt``)
``source_id``          bytes        where the pair came from (e.g. ``pickapic:<ranking_id>``, ``file:line``)
``image_chosen``       bytes        encoded image (JPEG/PNG/...) of the chosen (preferred / safe) image
``image_rejected``     bytes        ... of the rejected (dispreferred / unsafe) image
``moments_chosen``     bytes        *or*, instead of the images, VAE posterior moments ``[h, w, 2c]`` =
``moments_rejected``   bytes        ``concat([mean, logvar], -1)`` as raw little-endian ``latent_dtype``
``text_states``        bytes        optional: text-encoder states ``[L, D]`` of the prompt, raw ``text_dtype``
``text_states_chosen`` bytes        ... of ``prompt_chosen`` (present when both text states and it are)
``cost_chosen``        float        optional (both or neither): safety cost of the chosen image
``cost_rejected``      float        ... of the rejected image
``harmful_prompt``     int64        optional: 1 when the prompt is harmful (SC-DPO's mix), else 0
====================== ============ ==================================================================

"Chosen" is always first: builders of formats that mark the preferred image otherwise (Pick-a-Pic's
``label_0``) put it first, as the official Diffusion-DPO code does. For DUO, chosen = safe x+, rejected =
unsafe x-, ``prompt`` is the unsafe prompt and ``prompt_chosen`` (when the dataset has it) the safe prompt the
safe image was made with (DUO's ``--given_prompt`` mode conditions each image on its own prompt).

Which optional fields a dataset has is in its spec (``has_costs``, ``has_harmful_prompt``, ``has_chosen_prompt``,
``text_states_shape``); a spec JSON without one of these keys (written before the key existed) reads as its
default, i.e. without the field.

The moments fields are named for what they hold (moments, not latents: readers sample or take the mean).
Datasets of format ``sc_dpo_jax.records/1`` store them as ``latent_chosen`` / ``latent_rejected``;
``records.open_source`` reads those under the current names (:attr:`RecordSpec.stored_names`).

**Prompt records** (``kind = "prompt"``): ``prompt``, ``negative_prompt`` (bytes, may be empty), ``seed``
(int64, -1 = not given), ``guidance`` (float, -1 = not given), ``categories`` (bytes, comma-separated, as
I2P's CSV has them; may be empty), ``source_id``; optionally ``prompt_chosen`` (``has_chosen_prompt``): the
prompt's safe rewrite, the prompt whose images should be preferred (the RL trainer's rewrite exploration,
``rl.rewrite_samples``; a safe prompt is its own rewrite).

Arrays are stored as raw bytes (not ``float_list``) because decoding raw bytes is a copy while parsing a
float list of 32k values per latent costs more than the rest of the pipeline. Their shapes live in the spec.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

PAIR = "pair"
PROMPT = "prompt"
KINDS = (PAIR, PROMPT)
IMAGE = "image"
LATENT = "latent"
ARRAY_DTYPES = ("float32", "float16")

PAIR_STRINGS = ("prompt", "source_id")
PROMPT_STRINGS = ("prompt", "negative_prompt", "categories", "source_id")


class RecordError(ValueError):
  """A record that does not match its spec; the message names the field (and, from readers, file and index)."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """Which fields the records of one dataset have, and the shapes of their arrays.

  ``image_format`` (pairs): ``"image"`` (encoded images) or ``"latent"`` (moments of shape ``latent_shape``).
  ``latent_scaling_factor`` / ``latent_shift_factor``: of the VAE that made the latents, so a reader turns
  moments into the diffusion model's latents ``(sample - shift) * scale`` without the VAE.
  """
  kind: str = PAIR
  image_format: str = IMAGE
  latent_shape: Optional[Tuple[int, int, int]] = None
  latent_dtype: str = "float32"
  latent_scaling_factor: Optional[float] = None
  latent_shift_factor: Optional[float] = None
  text_states_shape: Optional[Tuple[int, int]] = None
  text_dtype: str = "float32"
  has_costs: bool = False
  has_harmful_prompt: bool = False
  has_chosen_prompt: bool = False      # pairs: ``prompt_chosen`` (and ``text_states_chosen`` with text states)
  # Field name -> the feature name the files store it under, where the two differ (datasets of an older
  # format; set by ``records.open_source``). Reading (``parse_python``, ``data.decode``) looks fields up under
  # these names and returns them under the field names; writing always uses the field names. Not in the JSON.
  stored_names: Tuple[Tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

  def __post_init__(self):
    object.__setattr__(self, "stored_names", tuple((str(k), str(v)) for k, v in dict(self.stored_names).items()))
    if self.kind not in KINDS:
      raise ValueError(f"RecordSpec.kind = {self.kind!r}; choose one of {KINDS}")
    for name in ("latent_shape", "text_states_shape"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(int(v) for v in value))
    if self.kind == PROMPT:
      if (self.image_format != IMAGE or self.latent_shape or self.text_states_shape or self.has_costs
          or self.has_harmful_prompt):
        raise ValueError("prompt records have no images, latents, text states, costs or harmful flag")
      return
    if self.image_format not in (IMAGE, LATENT):
      raise ValueError(f"RecordSpec.image_format = {self.image_format!r}; choose 'image' or 'latent'")
    if self.image_format == LATENT:
      if self.latent_shape is None or len(self.latent_shape) != 3 or self.latent_shape[-1] % 2:
        raise ValueError(f"RecordSpec.latent_shape = {self.latent_shape!r}: latent records need [h, w, 2c] "
                         f"(mean and logvar concatenated on the channel axis)")
      if self.latent_scaling_factor is None:
        raise ValueError("RecordSpec.latent_scaling_factor is required for latent records (the VAE's "
                         "config.scaling_factor)")
    elif self.latent_shape is not None:
      raise ValueError("RecordSpec.latent_shape is only for image_format='latent'")
    if self.text_states_shape is not None and len(self.text_states_shape) != 2:
      raise ValueError(f"RecordSpec.text_states_shape = {self.text_states_shape!r}; expected [L, D]")
    for name in ("latent_dtype", "text_dtype"):
      if getattr(self, name) not in ARRAY_DTYPES:
        raise ValueError(f"RecordSpec.{name} = {getattr(self, name)!r}; choose one of {ARRAY_DTYPES}")

  # -- the fields ------------------------------------------------------------------------------------------

  @property
  def string_fields(self) -> Tuple[str, ...]:
    chosen_prompt = ("prompt_chosen",) if self.has_chosen_prompt else ()
    if self.kind == PROMPT:
      return PROMPT_STRINGS + chosen_prompt
    images = ("image_chosen", "image_rejected") if self.image_format == IMAGE else ()
    return PAIR_STRINGS + chosen_prompt + images

  @property
  def array_fields(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Raw-bytes array fields: name -> (shape, dtype)."""
    out = {}
    if self.kind == PAIR and self.image_format == LATENT:
      out["moments_chosen"] = (self.latent_shape, self.latent_dtype)
      out["moments_rejected"] = (self.latent_shape, self.latent_dtype)
    if self.text_states_shape is not None:
      out["text_states"] = (self.text_states_shape, self.text_dtype)
      if self.has_chosen_prompt:
        out["text_states_chosen"] = (self.text_states_shape, self.text_dtype)
    return out

  @property
  def float_fields(self) -> Tuple[str, ...]:
    if self.kind == PROMPT:
      return ("guidance",)
    return ("cost_chosen", "cost_rejected") if self.has_costs else ()

  @property
  def int_fields(self) -> Tuple[str, ...]:
    if self.kind == PROMPT:
      return ("seed",)
    return ("harmful_prompt",) if self.has_harmful_prompt else ()

  @property
  def fields(self) -> Tuple[str, ...]:
    return self.string_fields + tuple(self.array_fields) + self.float_fields + self.int_fields

  def stored_name(self, name: str) -> str:
    """The feature name under which the files store field ``name`` (see :attr:`stored_names`)."""
    return dict(self.stored_names).get(name, name)

  def _label(self, name: str) -> str:
    stored = self.stored_name(name)
    return repr(name) if stored == name else f"{name!r} (stored as {stored!r})"

  # -- JSON --------------------------------------------------------------------------------------------------

  def to_json(self) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
            if k != "stored_names"}

  @classmethod
  def from_json(cls, data: Mapping[str, Any], *, where: str = "record spec") -> "RecordSpec":
    known = {f.name for f in dataclasses.fields(cls)} - {"stored_names"}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"{where}: unknown record spec keys {unknown}; known: {sorted(known)}")
    try:
      return cls(**data)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from e

  # -- TFDS ---------------------------------------------------------------------------------------------------

  def tfds_features(self):
    """The same schema as a ``tfds.features.FeaturesDict`` (for the TFDS builders); TFDS serialises it to
    exactly these ``tf.train.Example`` features (images as the given encoded bytes)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    feats = {}
    for name in self.string_fields:
      feats[name] = tfds.features.Text()
    if self.array_fields:
      raise ValueError("TFDS builders write encoded images; latents and text states come from data.precompute")
    for name in self.float_fields:
      feats[name] = tfds.features.Scalar(dtype=np.float32)
    for name in self.int_fields:
      feats[name] = tfds.features.Scalar(dtype=np.int64)
    return tfds.features.FeaturesDict(feats)

  # -- writing -----------------------------------------------------------------------------------------------

  def check_record(self, record: Mapping[str, Any], *, where: str = "record") -> Dict[str, Any]:
    """``record`` checked against this spec and normalised (bytes, contiguous arrays of the spec's dtype,
    Python floats/ints). Missing or unknown fields, wrong shapes and non-finite values raise
    :class:`RecordError` naming the field and ``where``."""
    missing = [f for f in self.fields if f not in record]
    if missing:
      raise RecordError(f"{where}: missing field(s) {missing} (spec fields: {list(self.fields)})")
    unknown = sorted(set(record) - set(self.fields))
    if unknown:
      raise RecordError(f"{where}: field(s) {unknown} are not in the spec (fields: {list(self.fields)})")
    out: Dict[str, Any] = {}
    for name in self.string_fields:
      value = record[name]
      if isinstance(value, str):
        value = value.encode("utf-8")
      if not isinstance(value, (bytes, bytearray)):
        raise RecordError(f"{where}: field {name!r} must be str or bytes, got {type(value).__name__}")
      if name.startswith("image_") and not value:
        raise RecordError(f"{where}: field {name!r} is empty (no encoded image)")
      out[name] = bytes(value)
    for name, (shape, dtype) in self.array_fields.items():
      value = np.asarray(record[name])
      if value.shape != tuple(shape):
        raise RecordError(f"{where}: field {name!r} has shape {value.shape}, the spec says {tuple(shape)}")
      if not np.all(np.isfinite(value)):
        raise RecordError(f"{where}: field {name!r} has non-finite values")
      out[name] = np.ascontiguousarray(value, dtype=np.dtype(dtype).newbyteorder("<"))
    for name in self.float_fields:
      value = _scalar(record[name], float, name, where)
      if name != "guidance" and not math.isfinite(value):
        raise RecordError(f"{where}: field {name!r} = {value} is not finite")
      out[name] = value
    for name in self.int_fields:
      out[name] = int(_scalar(record[name], int, name, where))
    return out

  def serialize(self, record: Mapping[str, Any], *, where: str = "record") -> bytes:
    """One ``tf.train.Example`` (serialised) of ``record`` after :meth:`check_record`."""
    from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=g-import-not-at-top
    rec = self.check_record(record, where=where)
    feature = {}
    for name in self.string_fields:
      feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[rec[name]]))
    for name in self.array_fields:
      feature[name] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[rec[name].tobytes()]))
    for name in self.float_fields:
      feature[name] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[rec[name]]))
    for name in self.int_fields:
      feature[name] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[rec[name]]))
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString()

  def parse_python(self, serialized: bytes) -> Dict[str, Any]:
    """A serialised record -> dict of Python/numpy values, checked like :meth:`check_record` (the slow,
    precise path: readers use it to explain a record that the fast graph path rejected). Fields are looked up
    under their :meth:`stored_name` and returned under their field names."""
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    try:
      example = example_pb2.Example.FromString(serialized)
    except Exception as e:  # protobuf raises its own DecodeError
      raise RecordError(f"not a tf.train.Example ({e})") from e
    feats = example.features.feature
    out: Dict[str, Any] = {}
    for name in self.fields:
      stored, label = self.stored_name(name), self._label(name)
      if stored not in feats:
        raise RecordError(f"missing field {label}")
      kind = feats[stored].WhichOneof("kind")
      want = ("float_list" if name in self.float_fields else
              "int64_list" if name in self.int_fields else "bytes_list")
      if kind != want:
        raise RecordError(f"field {label} is a {kind}, expected a {want}")
      values = list(getattr(feats[stored], want).value)
      if len(values) != 1:
        raise RecordError(f"field {label} has {len(values)} values, expected 1")
      value = values[0]
      if name in self.array_fields:
        shape, dtype = self.array_fields[name]
        dt = np.dtype(dtype).newbyteorder("<")
        expected = int(np.prod(shape)) * dt.itemsize
        if len(value) != expected:
          raise RecordError(f"field {label} has {len(value)} bytes; shape {tuple(shape)} of {dtype} needs "
                            f"{expected} (wrong latent/state shape for this dataset?)")
        value = np.frombuffer(value, dt).reshape(shape)
      out[name] = value
    return self.check_record(out, where="record")


def _scalar(value, kind, name, where):
  arr = np.asarray(value)
  if arr.shape != () or arr.dtype.kind not in "biuf":
    raise RecordError(f"{where}: field {name!r} must be a number, got {value!r}")
  if kind is int and arr.dtype.kind == "f" and not float(arr).is_integer():
    raise RecordError(f"{where}: field {name!r} must be an integer, got {value!r}")
  return kind(arr)


def pair_spec(**kwargs) -> RecordSpec:
  return RecordSpec(kind=PAIR, **kwargs)


def prompt_spec(has_chosen_prompt: bool = False) -> RecordSpec:
  """Prompt records; ``has_chosen_prompt``: each has its safe rewrite in ``prompt_chosen``."""
  return RecordSpec(kind=PROMPT, has_chosen_prompt=has_chosen_prompt)


def spec_json(spec: RecordSpec) -> str:
  return json.dumps(spec.to_json(), indent=2, sort_keys=True)


def split_categories(value: bytes | str) -> Sequence[str]:
  """``b"sexual, violence"`` -> ``["sexual", "violence"]`` (empty -> [])."""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  return [c.strip() for c in value.split(",") if c.strip()]
