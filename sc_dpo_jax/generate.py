"""Generate (or SDEdit) images with a diffusers-format Stable Diffusion folder and write a PNG grid.

  python -m sc_dpo_jax.generate --model DIR --prompt "a photo of a cat" --num_images 4 --out grid.png
  python -m sc_dpo_jax.generate --model DIR --prompt "a dressed person" --init_image in.png --strength 0.75 \\
      --out edited.png

``--safety=medium`` (weak|medium|strong|max) samples with Safe Latent Diffusion (diffusers'
``StableDiffusionPipelineSafe`` presets; ``diffusion.safe_guidance``); it needs ``--guidance`` > 1 and no
``--init_image``. ``--projection=nudity,naked`` samples with the SAFREE-style projection of the prompt's text
states away from those concepts (``diffusion.prompt_projection``); also text to image only.

Image ``i`` of prompt ``p`` uses seed ``--seed`` folded with its index, so the same flags give the same
pictures on any batch size. ``--out_dir`` also writes every image as its own PNG.
"""
import os

import numpy as np
from absl import app, flags, logging

from sc_dpo_jax.images import make_grid

_MODEL = flags.DEFINE_string("model", None, "A diffusers Stable Diffusion folder (model_index.json, unet/, ...).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt; repeat the flag for several.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt used for every image.")
_NUM = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (<= 1: no guidance).")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic, 1: DDPM-like).")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the model's).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the model's).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per device batch.")
_INIT = flags.DEFINE_string("init_image", None, "SDEdit: start from this image (resized to --height/--width).")
_STRENGTH = flags.DEFINE_float("strength", 0.75, "SDEdit strength in (0, 1].")
_SAFETY = flags.DEFINE_enum("safety", "none", ["none", "weak", "medium", "strong", "max"],
                            "Safe Latent Diffusion preset (none: off). Not with --init_image.")
_PROJECTION = flags.DEFINE_list("projection", [], "SAFREE-style projection away from these concepts "
                                "(comma-separated texts; empty: off). Not with --init_image.")
_ATTENTION = flags.DEFINE_enum("attention", "reference", ["reference", "xla", "cudnn"], "Attention kernel.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
_OUT = flags.DEFINE_string("out", "grid.png", "Where to write the PNG grid.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Also write each image here as NNNN.png.")
flags.mark_flags_as_required(["model", "prompt"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from sc_dpo_jax import models  # pylint: disable=g-import-not-at-top
  if _NUM.value < 1:
    raise app.UsageError("--num_images must be at least 1")
  safety = None if _SAFETY.value == "none" else _SAFETY.value
  if safety is not None and _INIT.value:
    raise app.UsageError("--safety works with text to image only, not with --init_image (SDEdit)")
  if safety is not None and _GUIDANCE.value <= 1:
    raise app.UsageError("--safety needs classifier-free guidance: --guidance must be > 1")
  projection = None
  if _PROJECTION.value:
    from sc_dpo_jax.diffusion.prompt_projection import ProjectionConfig  # pylint: disable=g-import-not-at-top
    if _INIT.value:
      raise app.UsageError("--projection works with text to image only, not with --init_image (SDEdit)")
    projection = ProjectionConfig(concepts=tuple(_PROJECTION.value))
  pipe = models.load_pipeline(_MODEL.value, dtype=jnp.dtype(_DTYPE.value), attention=_ATTENTION.value)
  prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
  common = dict(seed=_SEED.value, steps=_STEPS.value, guidance=_GUIDANCE.value, eta=_ETA.value,
                negative_prompt=_NEGATIVE.value, batch_size=_BATCH.value)
  if _INIT.value:
    size = (_WIDTH.value or pipe.default_size, _HEIGHT.value or pipe.default_size)
    init = np.asarray(Image.open(_INIT.value).convert("RGB").resize(size, Image.BICUBIC))
    images = pipe.edit(np.stack([init] * len(prompts)), prompts, strength=_STRENGTH.value, **common)
  else:
    images = pipe.generate(prompts, height=_HEIGHT.value, width=_WIDTH.value, safety=safety,
                           projection=projection, **common)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  Image.fromarray(make_grid(images, columns=_NUM.value)).save(_OUT.value)
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    for i, image in enumerate(images):
      Image.fromarray(image).save(os.path.join(_OUT_DIR.value, f"{i:04d}.png"))
  logging.info("wrote %d images (%d prompts x %d) to %s", len(images), len(_PROMPT.value), _NUM.value,
               _OUT.value)
  print(os.path.abspath(_OUT.value))


if __name__ == "__main__":
  app.run(main)
