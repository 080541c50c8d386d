"""Small synthetic datasets, for the tiny configs and the benchmarks of the trainers' plumbing.

    source = write_synthetic_pairs("workdir/data/pairs", num_pairs=64, resolution=16)     # the DPO trainers'
    source = write_synthetic_prompts("workdir/data/prompts", num_prompts=12)              # the RL trainer's

Each pair: the chosen image shows a blue shape, the rejected one the same shape in red, on a random
background, under a prompt naming the shape; costs are 0 (chosen) and 1 (rejected), and every other prompt
is flagged harmful. The prompt set alternates harmful prompts (naming red, the toy world's unsafe colour) and
safe ones. They exercise every field of the pair schema through the real writer and reader; it is
not the toy world (``sc_dpo_jax.toy``), whose images and judge are built to measure alignment.
"""
from __future__ import annotations

import io
import os

import numpy as np

from sc_dpo_jax.data import records, schema

SHAPES = ("square", "circle", "bar")


def _draw(rng: np.random.Generator, shape: str, color, resolution: int) -> bytes:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  background = tuple(int(c) for c in rng.integers(40, 200, 3))
  image = Image.new("RGB", (resolution, resolution), background)
  draw = ImageDraw.Draw(image)
  size = int(resolution * rng.uniform(0.35, 0.6))
  x0, y0 = (int(v) for v in rng.integers(0, resolution - size + 1, 2))
  box = [x0, y0, x0 + size - 1, y0 + size - 1]
  if shape == "circle":
    draw.ellipse(box, fill=color)
  elif shape == "bar":
    draw.rectangle([x0, y0 + size // 3, x0 + size - 1, y0 + 2 * size // 3], fill=color)
  else:
    draw.rectangle(box, fill=color)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


def synthetic_pairs(num_pairs: int, resolution: int, seed: int = 0):
  """The records (dicts of the pair schema with costs and the harmful flag)."""
  rng = np.random.default_rng(seed)
  for i in range(num_pairs):
    shape = SHAPES[i % len(SHAPES)]
    state = rng.bit_generator.state
    chosen = _draw(rng, shape, (30, 60, 220), resolution)
    rng.bit_generator.state = state                         # the same layout for the rejected image
    rejected = _draw(rng, shape, (220, 40, 30), resolution)
    yield {"prompt": f"a {shape}", "source_id": f"synthetic:{i}", "image_chosen": chosen,
           "image_rejected": rejected, "cost_chosen": 0.0, "cost_rejected": 1.0, "harmful_prompt": i % 2}


def write_synthetic_pairs(folder: str, *, num_pairs: int = 64, resolution: int = 16, seed: int = 0,
                          num_shards: int = 2) -> records.Source:
  """Writes the dataset to ``folder`` (once: an existing complete folder is reused)."""
  if os.path.exists(os.path.join(folder, records.INFO_FILE)):
    return records.open_source(folder)
  spec = schema.pair_spec(has_costs=True, has_harmful_prompt=True)
  return records.write_records(folder, spec, list(synthetic_pairs(num_pairs, resolution, seed)),
                               name="synthetic", num_shards=num_shards)


# The RL trainer's tiny prompts: the toy world's unsafe concept is the colour red, so prompts naming it are the
# harmful ones (categories "red"); the rest are safe. Short enough for the tiny tokenizer.
HARMFUL_PROMPTS = ("a red square", "a red circle", "a red bar", "red paint", "a crimson box", "a red dot")
SAFE_PROMPTS = ("a blue square", "a green circle", "a blue bar", "blue paint", "a yellow box", "a green dot")


def synthetic_prompt_records(num_prompts: int):
  """``num_prompts`` prompt records alternating harmful and safe prompts; each has its safe rewrite in
  ``prompt_chosen`` (a harmful prompt's is the safe prompt of the same index, a safe prompt's is itself)."""
  out = []
  for i in range(num_prompts):
    harmful = i % 2 == 0
    index = (i // 2) % len(HARMFUL_PROMPTS)
    prompt = (HARMFUL_PROMPTS if harmful else SAFE_PROMPTS)[index]
    out.append({"prompt": prompt, "prompt_chosen": SAFE_PROMPTS[index], "negative_prompt": "", "seed": -1,
                "guidance": -1.0, "categories": "red" if harmful else "", "source_id": f"synthetic_prompts:{i}"})
  return out


def write_synthetic_prompts(folder: str, *, num_prompts: int = 12) -> records.Source:
  """Writes the synthetic prompt set to ``folder`` once (an existing complete folder is reused)."""
  if os.path.exists(os.path.join(folder, records.INFO_FILE)):
    return records.open_source(folder)
  if num_prompts < 1:
    raise ValueError(f"config.data.synthetic_prompts = {num_prompts}: write at least one prompt")
  return records.write_records(folder, schema.prompt_spec(has_chosen_prompt=True),
                               synthetic_prompt_records(num_prompts),
                               name="synthetic_prompts")
