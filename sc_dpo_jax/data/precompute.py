"""Precompute VAE latents (and text states) of an image-pair dataset, resumably.

    python -m sc_dpo_jax.data.precompute --source=/data/tfds/pairs_table/costs/1.0.0 --model=/models/sd15 \
        --out=/data/latents/pairs_sd15 [--resolution=512 --batch_size=8 --records_per_shard=1000]

Training on encoded images runs the VAE encoder (and the text encoder) on every pair of every step, though
neither is trained; on stored latents the input pipeline reads a few KiB per pair and the device runs the UNet
only. This reads an image-pair dataset (``records.open_source``: ours or TFDS-prepared) in file order with
the training pipeline's decoding (shorter side resized to ``--resolution``, default the model's size, then
centre-cropped; no flips: a latent dataset cannot be flipped, so flip before precomputing if you want flips),
encodes chosen and rejected images with the model's VAE in one jitted call per batch, and the prompts with its
text encoder (``--notext_states`` leaves them out), and writes latent pair records (``data.schema``):

* ``moments_chosen`` / ``moments_rejected``: the posterior *moments* ``[h, w, 2c]`` (mean and logvar), not a
  sample, so the reader draws fresh noise per epoch (``DataIterator(latents="sample")`` or, on the device,
  ``data.latents.sample_latents``) as training on images does;
* ``text_states`` ``[L, D]``, and ``prompt``, ``source_id``, costs and the harmful flag passed through;
* for a source with the chosen image's own prompt (``prompt_chosen``, e.g. DUO pairs from
  ``data.build_duo_pairs``): ``prompt_chosen`` passed through and its states ``text_states_chosen`` ``[L, D]``
  (what DUO's ``objective.duo_prompts = "given"`` conditions the chosen image on);
* the VAE's ``scaling_factor`` (and ``shift_factor``, None for SD1.x/2.x) in the record spec.

It runs in one process on the default device: run it once, not under a multi-host launcher. Of the model folder
it loads the VAE, text encoder and tokenizer only (:func:`load_encoders`), not the UNet.

The output has ``ceil(input records / records_per_shard)`` shards: shard ``i`` holds the next
``records_per_shard`` good records, so the last shards are short (or empty) when bad records were skipped.

**Resume**: after each shard, ``progress.json`` in the output folder records the settings, the shard counts
so far and the input position. Calling again with the same arguments continues with the next shard (a
changed setting is a ValueError naming it); ``max_shards`` stops a call after that many shards (time-boxed
jobs), and a later call finishes the run. ``dataset_info.json`` is written last, so a folder with it is
complete; writing over one needs ``--overwrite``, which deletes this dataset's files (info, progress, shards)
and nothing else in the folder.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from sc_dpo_jax.data import pipeline, records, schema
from sc_dpo_jax.data.schema import IMAGE, PAIR

PROGRESS_FILE = "progress.json"
# /2 writes records.FORMAT sc_dpo_jax.records/2; the shards of an unfinished /1 run hold the old field names,
# so such a run cannot be continued under the new ones.
PROGRESS_FORMAT = "sc_dpo_jax.precompute/2"


def precompute(source_dir: str, model_dir: str, out_dir: str, *, resolution: Optional[int] = None,
               batch_size: int = 8, records_per_shard: int = 1000, text_states: bool = True,
               skip_bad_records: bool = False, split: str = "train", name: str = "latents",
               max_shards: Optional[int] = None, overwrite: bool = False,
               progress: bool = True) -> Optional[records.Source]:
  """Writes the latent pair dataset of ``source_dir`` encoded by the pipeline in ``model_dir`` to ``out_dir``.

  Returns the written dataset's :class:`~sc_dpo_jax.data.records.Source`, or None when ``max_shards`` stopped
  this call before the last shard (call again with the same arguments to continue). See the module docstring.

  Args:
    source_dir: an image-pair dataset folder (``records.open_source``); ``split`` chooses a TFDS split.
    model_dir: a diffusers Stable Diffusion folder (its VAE, text encoder and tokenizer: :func:`load_encoders`).
    out_dir: the output folder (created).
    resolution: image side before encoding (default: the model's ``default_size``); a multiple of the VAE's
      downsampling factor, so the latents decode back to this size.
    batch_size: pairs per encoder call (the last partial batch is padded to it, so nothing recompiles).
    records_per_shard: good records per output shard.
    text_states: also store the text encoder's states of each prompt.
    skip_bad_records: skip and count undecodable input records instead of raising ``RecordError``.
    name: the output shards' name prefix.
    max_shards: write at most this many shards in this call.
    overwrite: replace a finished (or restart an unfinished) dataset in ``out_dir``.
    progress: show a progress bar.
  """
  start = time.perf_counter()
  for key, value in (("batch_size", batch_size), ("records_per_shard", records_per_shard)):
    if int(value) != value or value < 1:
      raise ValueError(f"{key} = {value!r} must be a positive integer")
  if max_shards is not None and (int(max_shards) != max_shards or max_shards < 1):
    raise ValueError(f"max_shards = {max_shards!r} must be a positive integer or None")
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise ValueError(f"name = {name!r}: use letters, digits, '_', '.' and '-' (it names the shard files)")
  source_dir = os.path.abspath(os.path.expanduser(source_dir))
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if out_dir == source_dir or (os.path.isdir(out_dir) and os.path.samefile(out_dir, source_dir)):
    raise ValueError(f"{out_dir}: the output folder is the source folder; write the latents elsewhere")

  source = records.open_source(source_dir, split=split)
  if source.spec.kind != PAIR or source.spec.image_format != IMAGE:
    what = "prompt" if source.spec.kind != PAIR else f"{source.spec.image_format} pair"
    raise ValueError(f"{source_dir}: a {what} dataset; precompute reads pair datasets of encoded images")
  if source.total == 0:
    raise ValueError(f"{source_dir}: the dataset has no records")
  _prepare_out_dir(out_dir, name, overwrite)
  settings = _plain({
      "source_files": list(source.files), "source_num_records": [int(n) for n in source.num_records],
      "model_dir": model_dir, "resolution": resolution, "text_states": bool(text_states),
      "records_per_shard": int(records_per_shard), "skip_bad_records": bool(skip_bad_records),
      "batch_size": int(batch_size), "name": name,
  })
  progress_path = os.path.join(out_dir, PROGRESS_FILE)
  # Check what can be checked before loading the model (seconds for SD); the default resolution needs it.
  _load_progress(progress_path, {k: v for k, v in settings.items() if k != "resolution" or resolution})

  encoders = load_encoders(model_dir)
  factor = encoders.vae_scale_factor
  if not resolution and encoders.default_size is None:
    raise ValueError(f"{model_dir}/unet/config.json has no sample_size; give the resolution")
  resolution = int(resolution or encoders.default_size)
  if resolution < 1 or resolution % factor:
    raise ValueError(f"resolution = {resolution} must be a positive multiple of the VAE's factor {factor} "
                     f"(the model's own size is {encoders.default_size})")
  vae_config = encoders.vae.config
  side = resolution // factor
  text_shape = (encoders.tokenizer.max_length, encoders.text_encoder.config.hidden_size)
  out_spec = schema.pair_spec(
      image_format=schema.LATENT, latent_shape=(side, side, 2 * vae_config.latent_channels),
      latent_scaling_factor=float(vae_config.scaling_factor),
      latent_shift_factor=_optional_float(getattr(vae_config, "shift_factor", None)),
      text_states_shape=text_shape if text_states else None,
      has_costs=source.spec.has_costs, has_harmful_prompt=source.spec.has_harmful_prompt,
      has_chosen_prompt=source.spec.has_chosen_prompt)
  num_shards = math.ceil(source.total / records_per_shard)
  settings["resolution"] = resolution
  saved = _load_progress(progress_path, settings)
  counts: List[int] = [int(n) for n in saved["shards"]] if saved else []
  previous_seconds = float(saved.get("seconds", 0.0)) if saved else 0.0
  writer = records.ShardWriter(out_dir, out_spec, name=name, num_shards=num_shards)
  if len(counts) > num_shards:
    raise ValueError(f"{progress_path}: {len(counts)} shards done, but this dataset has {num_shards}")
  for i in range(len(counts)):
    if not os.path.exists(writer.path(i)):
      raise FileNotFoundError(f"{progress_path}: shard {i} is recorded as done but {writer.path(i)} is missing; "
                              f"pass overwrite=True (--overwrite) to start again")
  if saved:
    logging.info("%s: resuming after %d of %d shards", out_dir, len(counts), num_shards)

  it = pipeline.DataIterator(source, batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False,
                             process_index=0, process_count=1, resolution=resolution,
                             skip_bad_records=skip_bad_records)
  stream = _EncodedStream(it, encoders, out_spec, batch_size=batch_size, text_states=text_states,
                          resume=saved["resume"] if saved else None)
  bar = tqdm(total=source.total, initial=sum(counts) + stream.bad_records, unit="record", desc="precompute",
             disable=not progress)
  stream.bar = bar
  written_now = 0
  try:
    while len(counts) < num_shards:
      if max_shards is not None and written_now >= max_shards:
        break
      index = len(counts)
      counts.append(writer.write_shard(index, stream.take(records_per_shard)))
      written_now += 1
      records.write_json_atomic(progress_path, {
          "format": PROGRESS_FORMAT, "settings": settings, "shards": counts, "resume": stream.resume_point(),
          "seconds": previous_seconds + time.perf_counter() - start})
  finally:
    bar.close()
  seconds = previous_seconds + time.perf_counter() - start
  if len(counts) < num_shards:
    logging.info("%s: stopped after %d of %d shards (max_shards=%s); call again to continue", out_dir,
                 len(counts), num_shards, max_shards)
    return None

  stream.drain()
  written = int(sum(counts))
  if written + stream.bad_records != source.total:
    raise RuntimeError(f"{out_dir}: wrote {written} records and skipped {stream.bad_records} of "
                       f"{source.total} input records; the counts should add up")
  stats = {"input_records": source.total, "written": written, "bad_records_skipped": stream.bad_records,
           "seconds": round(seconds, 3), "source": source_dir, "split": split, "model_dir": model_dir,
           "resolution": resolution, "batch_size": int(batch_size), "text_states": bool(text_states)}
  result = writer.finish(counts, stats=stats,
                         description=f"VAE latent moments of {source_dir} encoded by {model_dir} at {resolution}px")
  os.remove(progress_path)
  logging.info("%s: %s", out_dir, json.dumps(stats, sort_keys=True))
  return result


# -- encoding ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoders:
  """The parts of a Stable Diffusion folder that precompute runs: the VAE, the text encoder and its tokenizer,
  and the model's image size (``StableDiffusion.default_size``)."""
  vae: Any
  vae_params: Any
  text_encoder: Any
  text_params: Any
  tokenizer: Any
  default_size: Optional[int]

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """Text states ``[B, L, D]``, as ``StableDiffusion.encode_prompts``."""
    return _encode_text(self.text_encoder, self.text_params, self.tokenizer(prompts))


def load_encoders(model_dir: str) -> Encoders:
  """Loads what :class:`Encoders` holds from a diffusers Stable Diffusion folder, in the components' folders
  that ``models.load_pipeline`` reads, without the UNet: it is most of the weights (3.4 of SD1.5's 4.3 GB in
  float32) and precompute never runs it. Only the UNet's ``config.json`` is read, for the image size."""
  from sc_dpo_jax.models import clip_io, io, vae_io  # pylint: disable=g-import-not-at-top
  from sc_dpo_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  index_path = os.path.join(model_dir, "model_index.json")
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder: {index_path} does not exist")
  vae, vae_params = vae_io.load_vae(os.path.join(model_dir, "vae"))
  text_encoder, text_params = clip_io.load_clip_text(os.path.join(model_dir, "text_encoder"))
  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(model_dir, "tokenizer"))
  sample_size = io.read_json(os.path.join(model_dir, "unet", "config.json")).get("sample_size")
  encoders = Encoders(vae, vae_params, text_encoder, text_params, tokenizer, None)
  if sample_size is not None:
    encoders.default_size = int(sample_size) * encoders.vae_scale_factor
  return encoders


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(text_encoder, params, ids):
  return text_encoder.apply({"params": params}, ids).last_hidden_state


@functools.partial(jax.jit, static_argnums=0)
def _encode_images(vae, params, chosen, rejected):
  """uint8 ``[B, R, R, 3]`` pairs -> moments ``[2B, h, w, 2c]`` (chosen first) in one call; images scaled to
  [-1, 1] as ``x / 255 * 2 - 1``, the same arithmetic as the pipeline's SDEdit and diffusers' processor."""
  images = jnp.concatenate([chosen, rejected]).astype(jnp.float32) / 255.0 * 2.0 - 1.0
  return vae.apply({"params": params}, images, method="encode").moments


def _pad(array: np.ndarray, size: int) -> np.ndarray:
  if len(array) == size:
    return array
  return np.concatenate([array, np.zeros((size - len(array),) + array.shape[1:], array.dtype)])


class _EncodedStream:
  """Output records one at a time from the input iterator, and the input position of the next one.

  Batches are dispatched to the device one ahead of the batch being written, so the device encodes while the
  host serialises. Output shards need not end on a batch boundary; the position of the next record is then
  ``(iterator state before its batch, how many records of that batch are already written)``, and a resumed
  stream re-reads that batch (with the same composition, so the same numbers) and drops the written ones.
  """

  def __init__(self, it: pipeline.DataIterator, encoders: Encoders, spec: schema.RecordSpec, *, batch_size: int,
               text_states: bool, resume: Optional[Mapping[str, Any]]):
    self.it, self.encoders, self.spec = it, encoders, spec
    self.batch_size, self.text_states = batch_size, text_states
    self.bar = None
    self._queue = collections.deque()      # dispatched batches: (state before, bad after, n, batch, outputs)
    self._records: List[Dict[str, Any]] = []
    self._pos = 0
    self._state_before: Dict[str, Any] = {}
    self._bad = 0
    self._skip = 0
    self._exhausted = False
    self._end_bad = 0
    if resume:
      state = resume["iterator"]
      if int(state["epoch"]) >= 1:          # saved at the end of the input (the one epoch is done)
        self._exhausted, self._end_bad = True, int(state["bad_records"])
      else:
        it.restore(state)
        self._skip = int(resume["skip"])
      self._bad = int(state["bad_records"])

  @property
  def bad_records(self) -> int:
    """Bad input records skipped up to the current batch."""
    return self._bad

  def take(self, count: int) -> Iterator[Dict[str, Any]]:
    for _ in range(count):
      record = self._next()
      if record is None:
        return
      yield record

  def drain(self) -> None:
    """At the end: reads to the end of the input (counting any trailing bad records); there must be no
    record left."""
    if self._next() is not None:
      raise RuntimeError("records left over after the last shard (a bug: shards hold all input records)")

  def resume_point(self) -> Dict[str, Any]:
    if self._pos < len(self._records):
      return {"iterator": self._state_before, "skip": self._pos}
    if self._queue:
      return {"iterator": self._queue[0][0], "skip": 0}
    return {"iterator": self.it.state(), "skip": 0}

  def _next(self) -> Optional[Dict[str, Any]]:
    while self._pos >= len(self._records):
      self._fill()                          # two batches dispatched: one to serialise, one on the device
      if not self._queue:
        self._count_bad(self._end_bad)      # the input ended: trailing bad records count now
        return None
      self._state_before, bad_after, n, batch, outputs = self._queue.popleft()
      self._records = self._to_records(n, batch, outputs)
      self._pos, self._skip = self._skip, 0   # after a resume, drop the records already written
      self._count_bad(bad_after)
    record = self._records[self._pos]
    self._pos += 1
    if self.bar is not None:
      self.bar.update(1)
    return record

  def _count_bad(self, bad: int):
    if self.bar is not None and bad != self._bad:
      self.bar.update(bad - self._bad)
      self.bar.set_postfix(bad=bad, refresh=False)
    self._bad = bad

  def _fill(self):
    while len(self._queue) < 2 and not self._exhausted:
      state = self.it.state()
      try:
        batch = next(self.it)
      except StopIteration:
        self._exhausted, self._end_bad = True, self.it.bad_records
        break
      self._queue.append((state, self.it.bad_records, len(batch["prompt"]), batch, self._dispatch(batch)))

  def _dispatch(self, batch):
    """Starts the (asynchronous) encoding of ``batch``, padded to the batch size."""
    n, size = len(batch["prompt"]), self.batch_size
    enc = self.encoders
    moments = _encode_images(enc.vae, enc.vae_params, _pad(batch["image_chosen"], size),
                             _pad(batch["image_rejected"], size))
    states = chosen_states = None
    if self.text_states:
      states = enc.encode_prompts(list(batch["prompt"]) + [""] * (size - n))
      if self.spec.has_chosen_prompt:
        chosen_states = enc.encode_prompts(list(batch["prompt_chosen"]) + [""] * (size - n))
    return moments, states, chosen_states

  def _to_records(self, n, batch, outputs) -> List[Dict[str, Any]]:
    moments, states, chosen_states = jax.device_get(outputs)
    size = self.batch_size
    out = []
    for i in range(n):
      record = {"prompt": batch["prompt"][i], "source_id": batch["source_id"][i],
                "moments_chosen": moments[i], "moments_rejected": moments[size + i]}
      if states is not None:
        record["text_states"] = states[i]
      if self.spec.has_chosen_prompt:
        record["prompt_chosen"] = batch["prompt_chosen"][i]
        if chosen_states is not None:
          record["text_states_chosen"] = chosen_states[i]
      if self.spec.has_costs:
        record["cost_chosen"] = float(batch["cost_chosen"][i])
        record["cost_rejected"] = float(batch["cost_rejected"][i])
      if self.spec.has_harmful_prompt:
        record["harmful_prompt"] = int(batch["harmful_prompt"][i])
      out.append(record)
    return out


# -- the output folder -------------------------------------------------------------------------------------------


def _shard_pattern(name: str) -> re.Pattern:
  return re.compile(re.escape(name) + r"-\d{5}-of-\d{5}\.tfrecord(\.tmp)?")


def _prepare_out_dir(out_dir: str, name: str, overwrite: bool) -> None:
  """Refuses a finished dataset unless ``overwrite``; with ``overwrite`` deletes this dataset's files (the info,
  the progress, its shards and shards named ``name-*``), never anything else in the folder."""
  info_path = os.path.join(out_dir, records.INFO_FILE)
  if os.path.exists(info_path):
    info = records.read_info(out_dir)
    if info.get("format") not in records.READABLE_FORMATS:
      raise ValueError(f"{info_path}: not a dataset written by this project (a TFDS dataset?); choose another "
                       f"output folder")
    if not overwrite:
      raise FileExistsError(f"{out_dir}: already holds a finished dataset ({records.INFO_FILE}); pass "
                            f"overwrite=True (--overwrite) to replace it")
  if not overwrite or not os.path.isdir(out_dir):
    return
  doomed = {records.INFO_FILE, PROGRESS_FILE, PROGRESS_FILE + ".tmp", records.INFO_FILE + ".tmp"}
  if os.path.exists(info_path):
    doomed.update(shard["file"] for shard in records.read_info(out_dir).get("shards", []) if "file" in shard)
  pattern = _shard_pattern(name)
  doomed.update(f for f in os.listdir(out_dir) if pattern.fullmatch(f))
  for file in sorted(doomed):
    path = os.path.join(out_dir, file)
    if os.path.isfile(path):
      os.remove(path)
  logging.info("%s: removed the previous dataset (overwrite)", out_dir)


def _plain(value):
  """JSON's view of ``value`` (tuples become lists), so settings compare equal to what was saved."""
  return json.loads(json.dumps(value))


def _optional_float(value) -> Optional[float]:
  return None if value is None else float(value)


def _load_progress(path: str, settings: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
  """The saved progress of an unfinished run with these ``settings``; a differing setting is a ValueError
  naming it and both values, since continuing would mix two kinds of records in one dataset."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); pass overwrite=True (--overwrite) to start again") from e
  missing = [k for k in ("format", "settings", "shards", "resume") if k not in saved]
  if missing or saved["format"] != PROGRESS_FORMAT:
    raise ValueError(f"{path}: not a precompute progress file of format {PROGRESS_FORMAT!r} (missing {missing} or "
                     f"format {saved.get('format')!r}); pass overwrite=True (--overwrite) to start again")
  for key, value in settings.items():
    old = saved["settings"].get(key, "<not set>")
    if old != value:
      raise ValueError(f"{path}: the unfinished run in this folder was started with {key}={old!r}, this call has "
                       f"{key}={value!r}; call with the same settings to continue it, or pass overwrite=True "
                       f"(--overwrite) to start again")
  return saved


# -- command line ------------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags, defined only when run as a program (as ``data.prepare``: importing this module must not
  define flags that clash with other modules', e.g. ``sc_dpo_jax.main``'s)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("source", None, "Image-pair dataset folder (ours or TFDS-prepared).", **fv)
  flags.DEFINE_string("model", None, "Stable Diffusion folder (diffusers layout) whose VAE and text encoder "
                      "encode the pairs.", **fv)
  flags.DEFINE_string("out", None, "Output folder of the latent pair dataset.", **fv)
  flags.DEFINE_integer("resolution", None, "Image side before encoding; default: the model's size.", **fv)
  flags.DEFINE_integer("batch_size", 8, "Pairs per encoder call.", **fv)
  flags.DEFINE_integer("records_per_shard", 1000, "Records per output shard.", **fv)
  flags.DEFINE_bool("text_states", True, "Also store the text encoder's states of each prompt.", **fv)
  flags.DEFINE_bool("skip_bad_records", False, "Skip and count undecodable input records instead of stopping.",
                    **fv)
  flags.DEFINE_string("split", "train", "Split of a TFDS-prepared source.", **fv)
  flags.DEFINE_string("name", "latents", "Name prefix of the output shards.", **fv)
  flags.DEFINE_bool("overwrite", False, "Replace a finished dataset in --out, or restart an unfinished one.", **fv)
  flags.DEFINE_integer("max_shards", None, "Stop after writing this many shards (run again to continue).", **fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", **fv)
  flags.mark_flags_as_required(["source", "model", "out"], flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  fv = flag_values
  result = precompute(fv.source, fv.model, fv.out, resolution=fv.resolution, batch_size=fv.batch_size,
                      records_per_shard=fv.records_per_shard, text_states=fv.text_states,
                      skip_bad_records=fv.skip_bad_records, split=fv.split, name=fv.name, max_shards=fv.max_shards,
                      overwrite=fv.overwrite, progress=fv.progress)
  out = os.path.abspath(os.path.expanduser(fv.out))
  if result is None:
    with open(os.path.join(out, PROGRESS_FILE)) as f:
      done = len(json.load(f)["shards"])
    print(f"stopped after {done} shards (--max_shards={fv.max_shards}); progress in "
          f"{os.path.join(out, PROGRESS_FILE)}; run again with the same flags to continue")
    return
  print(json.dumps(records.read_info(out)["stats"], indent=2, sort_keys=True))
  print(f"wrote {result.total} records in {len(result.files)} shards to {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
