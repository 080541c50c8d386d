"""The safety cost model trainer's inputs, up to the embedded pairs: the CLIP vision tower (:func:`load_clip`), the
pair datasets (:func:`open_sources`), and the embedding pass with its cache (:func:`source_embeddings`). CLIP is
frozen, so the normalised embeddings of both images of every pair are computed once (:func:`embed_pairs`, images
read by ``data.pipeline.DataIterator``, resized and centre-cropped to ``data.resolution``) and cached in
``<workdir>/embeddings/<split>.npz``, reused while the data, CLIP and resolution are the same (the fingerprint,
:func:`embeddings_fingerprint`). Each step then costs an MLP on ``[batch, D]`` embeddings instead of a ViT-L
forward of every image, the reason this trainer does not stream images as the DPO trainer does. Memory:
``2 * pairs * D * 4`` bytes (100k pairs with ViT-L's ``D = 768``: 0.6 GB). Several processes: process 0 writes
the tiny CLIP, the synthetic pairs and the cache, the others wait at a barrier and read them, so every process
trains on identical embeddings. The labels and batches made from the result are ``data.cost_pairs``'.
"""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from sc_dpo_jax import paths
from sc_dpo_jax.data import pipeline as data_pipeline
from sc_dpo_jax.data import records, schema, synthetic
from sc_dpo_jax.data.cost_pairs import PairSet
from sc_dpo_jax.models import CLIPVisionModel, load_clip_vision, save_clip_vision, tiny_vision_config
from sc_dpo_jax.models.random_init import host_random_params
from sc_dpo_jax.rewards.cost_model import SafetyCostModel, clip_signature
from sc_dpo_jax.parallel.multihost import barrier

EMBEDDINGS_VERSION = 1


def load_clip(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> Tuple[CLIPVisionModel, Any, str]:
  """``(clip, clip_params, clip_folder)``: ``model.clip_folder``, or for a tiny run without one a random tiny
  tower written once to ``<workdir>/clip`` by process 0 (so the export loads with ``load_cost_model(export, that
  folder)``), which every process then loads. ``clip_folder`` is absolute (or a URI)."""
  m = config.model
  if m.clip_folder:
    folder = paths.resolve(m.clip_folder)
  elif m.tiny:
    folder = paths.resolve(workdir) / "clip"
    # save_clip_vision writes config.json after the weights: a folder without it is an interrupted first
    # run's, written again over (the tower is a function of the seed, so the same bytes).
    if jax.process_index() == 0 and not (folder / "config.json").exists():
      clip = CLIPVisionModel(tiny_vision_config(), with_projection=True)
      save_clip_vision(str(folder), clip, host_random_params(clip, seed=int(config.seed)))
    barrier("cost model: tiny CLIP")
  else:
    raise ValueError("config.model.clip_folder is empty: set --config.model.clip_folder to a CLIP vision folder "
                     "with projection (transformers CLIPVisionModelWithProjection or CLIPModel, e.g. "
                     "openai/clip-vit-large-patch14), or use the :tiny variant")
  clip, params = load_clip_vision(str(folder), dtype=jnp.dtype(m.dtype), attention=m.attention)
  if not clip.with_projection:
    raise ValueError(f"{folder} (config.model.clip_folder) holds a CLIP vision tower without visual_projection; "
                     f"the cost model needs projected image embeddings: use a CLIPVisionModelWithProjection or "
                     f"CLIPModel folder")
  return clip, params, str(folder)


def open_sources(config: ml_collections.ConfigDict, workdir: paths.PathLike, resolution: int):
  """``(train source, eval source or None)``; a tiny run without ``data.train`` has process 0 write the
  synthetic pairs to ``<workdir>/data/synthetic_pairs`` (local workdirs only), which every process then reads."""
  d = config.data
  if d.train:
    train = records.open_source(d.train, split=d.split)
    where = d.train
  elif config.model.tiny:
    root = paths.resolve(workdir)
    if paths.is_uri(root):
      raise ValueError(f"config.data.train is empty and the workdir is {root}: a tiny run writes its synthetic "
                       f"pairs with local files only. Set --config.data.train to a local pair dataset folder, or "
                       f"use a local workdir")
    folder = str(root / "data" / "synthetic_pairs")
    if jax.process_index() == 0:
      synthetic.write_synthetic_pairs(folder, num_pairs=int(d.synthetic_pairs), resolution=resolution,
                                      seed=int(config.seed))
    barrier("cost model: synthetic pairs")
    train = records.open_source(folder)
    where = folder
  else:
    raise ValueError("config.data.train is empty: set --config.data.train to a pair dataset folder "
                     "(python -m sc_dpo_jax.data.prepare / data.precompute make them)")
  out = [(train, where, "data.train")]
  if d.eval:
    out.append((records.open_source(d.eval, split=d.eval_split), d.eval, "data.eval"))
  for source, path, key in out:
    if source.spec.kind != schema.PAIR:
      raise ValueError(f"{path} ({key}): a {source.spec.kind} dataset; the cost model trains on pairs")
    if source.spec.image_format != schema.IMAGE:
      raise ValueError(f"{path} ({key}): a dataset of VAE latents; the cost model needs the images (CLIP sees "
                       f"pixels): use the image dataset the latents were made from")
  return train, (out[1][0] if d.eval else None)


def embed_pairs(model: SafetyCostModel, clip_params, source: records.Source, *, resolution: int,
                batch_size: int, seed: int, skip_bad_records: bool, desc: str, progress: bool) -> Tuple[PairSet, int]:
  """Every pair of ``source`` (in file order) as normalised CLIP embeddings, plus its costs and harmful flag;
  returns ``(pairs, bad_records)``. One compiled program: the last batch is padded."""
  it = data_pipeline.DataIterator(source, batch_size=batch_size, seed=seed, resolution=resolution, shuffle=False,
                                  num_epochs=1, drop_remainder=False, skip_bad_records=skip_bad_records,
                                  process_index=0, process_count=1)
  embed = jax.jit(model.embed)
  parts: Dict[str, list] = {k: [] for k in ("emb_chosen", "emb_rejected", "cost_chosen", "cost_rejected",
                                            "harmful_prompt")}
  bar = tqdm(total=source.total, desc=desc, unit="pair", disable=not progress)
  for batch in it:
    n = len(batch["image_chosen"])
    images = np.concatenate([batch["image_chosen"], batch["image_rejected"]])
    if n < batch_size:
      pad = np.zeros((2 * (batch_size - n),) + images.shape[1:], images.dtype)
      images = np.concatenate([batch["image_chosen"], pad[:batch_size - n], batch["image_rejected"],
                               pad[batch_size - n:]])
    emb = np.asarray(embed(clip_params, images))
    parts["emb_chosen"].append(emb[:n])
    parts["emb_rejected"].append(emb[batch_size:batch_size + n])
    for key in ("cost_chosen", "cost_rejected", "harmful_prompt"):
      if key in batch:
        parts[key].append(np.asarray(batch[key]))
    bar.update(n)
  bar.close()
  if not parts["emb_chosen"]:
    raise ValueError(f"dataset {source.name!r} ({os.path.dirname(source.files[0])}) yielded no pairs")
  pairs = PairSet(**{k: np.concatenate(v) for k, v in parts.items() if v})
  pairs.emb_chosen, pairs.emb_rejected = pairs.emb_chosen.astype(np.float32), pairs.emb_rejected.astype(np.float32)
  if pairs.harmful_prompt is not None:
    pairs.harmful_prompt = pairs.harmful_prompt.astype(np.int32)
  return pairs, it.bad_records


def embeddings_fingerprint(config: ml_collections.ConfigDict, source: records.Source, model: SafetyCostModel,
                           clip_folder: str, resolution: int) -> Dict[str, Any]:
  """What the embeddings of ``source`` depend on: its files and record counts, the CLIP (folder and
  architecture), the dtype, resolution, normalisation and bad-record rule. A cache made with another is redone."""
  c = config
  return {"version": EMBEDDINGS_VERSION, "files": [os.path.abspath(f) for f in source.files],
          "num_records": [int(n) for n in source.num_records], "clip_folder": clip_folder,
          "clip": clip_signature(model.clip), "dtype": c.model.dtype, "resolution": resolution,
          "skip_bad_records": bool(c.data.skip_bad_records), "mean": list(model.mean), "std": list(model.std)}


def source_embeddings(config: ml_collections.ConfigDict, workdir: paths.PathLike, name: str,
                      model: SafetyCostModel, clip_params, clip_folder: str, source: records.Source, *,
                      resolution: int, progress: bool) -> Tuple[PairSet, Dict[str, Any]]:
  """``(pairs, info)`` of ``source``: :func:`shared_embeddings` in ``<workdir>/embeddings/<name>.npz`` under
  :func:`embeddings_fingerprint`, computed by :func:`embed_pairs` (``data.embed_batch_size`` pairs per CLIP
  call) when the cache is missing or stale."""
  c = config

  def compute():
    return embed_pairs(model, clip_params, source, resolution=resolution, batch_size=int(c.data.embed_batch_size),
                       seed=int(c.seed), skip_bad_records=bool(c.data.skip_bad_records), desc=f"embed {name}",
                       progress=progress)

  fingerprint = embeddings_fingerprint(c, source, model, clip_folder, resolution)
  return shared_embeddings(paths.resolve(workdir) / "embeddings" / f"{name}.npz", fingerprint, compute)


def read_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any]) -> Optional[Tuple[PairSet, int]]:
  """``(pairs, bad_records)`` of the cache file ``path`` (local or a URI) when it exists and was made with
  ``fingerprint``, else None."""
  path = paths.resolve(path)
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
    if str(z["fingerprint"]) != json.dumps(dict(fingerprint), sort_keys=True):
      logging.info("%s was made from other data or another CLIP", path)
      return None
    return PairSet(**{k: z[k] for k in z.files if k not in ("fingerprint", "bad_records")}), int(z["bad_records"])


def cached_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any],
                      compute) -> Tuple[PairSet, Dict[str, Any]]:
  """The :class:`PairSet` in ``path`` when it was made with the same ``fingerprint``, else ``compute()``'s,
  written to ``path`` (local: through a temporary file renamed into place; a URI: one object written whole).
  Returns ``(pairs, info)`` (info: cached, bad_records, seconds)."""
  path = paths.resolve(path)
  found = read_embeddings(path, fingerprint)
  if found is not None:
    return found[0], {"cached": True, "bad_records": found[1], "seconds": 0.0}
  t0 = time.time()
  pairs, bad = compute()
  buffer = io.BytesIO()
  np.savez(buffer, fingerprint=np.array(json.dumps(dict(fingerprint), sort_keys=True)), bad_records=np.array(bad),
           **pairs.arrays())
  if paths.is_uri(path):
    paths.write_bytes(path, buffer.getvalue())
  else:
    tmp = paths.write_bytes(path.parent / (path.name + ".tmp"), buffer.getvalue())
    tmp.replace(path)
  return pairs, {"cached": False, "bad_records": int(bad), "seconds": round(time.time() - t0, 2)}


def shared_embeddings(path: paths.PathLike, fingerprint: Mapping[str, Any],
                      compute) -> Tuple[PairSet, Dict[str, Any]]:
  """:func:`cached_embeddings` on process 0; the other processes wait for it at a barrier and read the file it
  wrote or reused, so every process trains on the same embeddings. One process: ``cached_embeddings``."""
  if jax.process_index() == 0:
    out = cached_embeddings(path, fingerprint, compute)
  barrier(f"cost model: embeddings {path}")
  if jax.process_index() == 0:
    return out
  found = read_embeddings(path, fingerprint)
  if found is None:
    raise FileNotFoundError(
        f"process {jax.process_index()} cannot read the embeddings process 0 wrote to {path} (missing, or made "
        f"from other data or another CLIP): the workdir must be one every process sees, a gs:// bucket or a "
        f"shared filesystem (the checkpoints need that too); set --workdir accordingly")
  return found[0], {"cached": True, "bad_records": found[1], "seconds": 0.0}
