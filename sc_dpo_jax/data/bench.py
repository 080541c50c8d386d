"""Input pipeline throughput: pairs per second for latent records and for 512-pixel JPEG pairs.

    python -m sc_dpo_jax.data.bench                         # both kinds, SD1.5 shapes
    python -m sc_dpo_jax.data.bench --kind=jpeg --seconds=20 --batch_size=16

Writes a synthetic dataset of the requested kind to a temporary folder (``--workdir`` keeps it), then reads
it with :class:`~sc_dpo_jax.data.pipeline.DataIterator` exactly as training does (shuffling, decoding,
batching, the bad-record guard) and prints pairs/s after a warm-up.

* ``latent``: SD1.5 shapes at 512 pixels: moments ``[64, 64, 8]`` float32 for both images plus text states
  ``[77, 768]`` (``--notext_states`` leaves them out); measured with the latents sampled on the host
  (``latents=sample``) and with the moments passed on for the device to sample (``latents=moments``).
* ``jpeg``: pairs of 512x512 JPEGs (quality 90) of smooth synthetic pictures (gradients, shapes, a little
  noise: about the size of photographs, unlike pure noise), decoded, resized to ``--resolution`` and
  centre-cropped, with random flips.

Goals on the 2-core development machine (issue 5): >= 1000 pairs/s latent, >= 60 pairs/s JPEG.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", "both", ["latent", "jpeg", "both"], "Which records to measure.")
flags.DEFINE_integer("num_pairs", 2048, "Pairs in the synthetic dataset (it repeats when exhausted).")
flags.DEFINE_integer("num_shards", 8, "Shard files of the synthetic dataset.")
flags.DEFINE_integer("batch_size", 32, "Per-host batch.")
flags.DEFINE_integer("resolution", 512, "Image side after resize and crop (jpeg).")
flags.DEFINE_integer("latent_size", 64, "Latent side (latent).")
flags.DEFINE_bool("text_states", True, "Latent records carry [77, 768] text states.")
flags.DEFINE_list("latents", ["sample", "moments"], "Latent modes to measure (data.decode.LATENT_MODES).")
flags.DEFINE_float("seconds", 10.0, "How long to measure after warm-up.")
flags.DEFINE_integer("warmup_batches", 5, "Batches read before timing.")
flags.DEFINE_string("workdir", None, "Keep the synthetic datasets here (default: a temporary folder).")


def synthetic_jpeg(rng: np.random.Generator, size: int = 512) -> bytes:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  base = rng.uniform(0, 255, 3)
  slope = rng.uniform(-120, 120, (2, 3))
  img = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 6, (size, size, 3))
  image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(6):
    x0, y0 = rng.integers(0, size - 64, 2)
    w, h = rng.integers(32, size // 2, 2)
    color = tuple(int(c) for c in rng.integers(0, 255, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_dataset(kind: str, folder: str, num_pairs: int, num_shards: int, *, latent_size: int = 64,
                  text_states: bool = True):
  from sc_dpo_jax.data import records, schema  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  if kind == "latent":
    spec = schema.pair_spec(image_format="latent", latent_shape=(latent_size, latent_size, 8),
                            latent_scaling_factor=0.18215, text_states_shape=(77, 768) if text_states else None)

    def make(i):
      rec = {"prompt": f"synthetic prompt {i}", "source_id": f"bench:{i}",
             "moments_chosen": rng.normal(0, 1, spec.latent_shape).astype(np.float32),
             "moments_rejected": rng.normal(0, 1, spec.latent_shape).astype(np.float32)}
      if text_states:
        rec["text_states"] = rng.normal(0, 1, (77, 768)).astype(np.float32)
      return rec
  else:
    spec = schema.pair_spec()
    pool = [synthetic_jpeg(rng) for _ in range(64)]     # drawing is slow; reuse 64 distinct pictures

    def make(i):
      return {"prompt": f"synthetic prompt {i}", "source_id": f"bench:{i}",
              "image_chosen": pool[i % 64], "image_rejected": pool[(7 * i + 3) % 64]}
  writer = records.ShardWriter(folder, spec, name=kind, num_shards=num_shards)
  bounds = [num_pairs * s // num_shards for s in range(num_shards + 1)]
  counts = [writer.write_shard(s, (make(i) for i in range(bounds[s], bounds[s + 1]))) for s in range(num_shards)]
  return writer.finish(counts)


def measure(source, *, batch_size: int, seconds: float, warmup_batches: int, **kwargs) -> dict:
  from sc_dpo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.DataIterator(source, batch_size=batch_size, seed=0, process_index=0, process_count=1, **kwargs)
  for _ in range(warmup_batches):
    next(it)
  start, pairs = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    pairs += len(next(it)["prompt"])
  elapsed = time.perf_counter() - start
  return {"pairs": pairs, "seconds": elapsed, "pairs_per_s": pairs / elapsed}


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  kinds = ["latent", "jpeg"] if FLAGS.kind == "both" else [FLAGS.kind]
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="sc_dpo_jax_bench_")
  try:
    for kind in kinds:
      folder = os.path.join(root, kind)
      t0 = time.perf_counter()
      from sc_dpo_jax.data import records  # pylint: disable=g-import-not-at-top
      if os.path.exists(os.path.join(folder, records.INFO_FILE)):
        source = records.open_source(folder)
      else:
        source = write_dataset(kind, folder, FLAGS.num_pairs, FLAGS.num_shards, latent_size=FLAGS.latent_size,
                               text_states=FLAGS.text_states)
      mb = sum(os.path.getsize(f) for f in source.files) / 2**20
      print(f"[{kind}] dataset: {source.total} pairs, {len(source.files)} shards, {mb:.0f} MiB "
            f"({mb * 1024 / source.total:.0f} KiB/pair), written in {time.perf_counter() - t0:.1f} s", flush=True)
      variants = ([(f"latents={m}", {"latents": m}) for m in FLAGS.latents] if kind == "latent" else
                  [(f"resolution={FLAGS.resolution}, random_flip", {"resolution": FLAGS.resolution,
                                                                     "random_flip": True})])
      for label, kwargs in variants:
        result = measure(source, batch_size=FLAGS.batch_size, seconds=FLAGS.seconds,
                         warmup_batches=FLAGS.warmup_batches, **kwargs)
        print(f"[{kind}] {label}: {result['pairs_per_s']:.1f} pairs/s ({result['pairs']} pairs in "
              f"{result['seconds']:.1f} s, batch {FLAGS.batch_size}, {os.cpu_count()} CPUs)", flush=True)
  finally:
    if FLAGS.workdir is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
